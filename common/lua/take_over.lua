-- Take the oldest pending entry of a dead consumer, or forget the consumer once it holds none. One script
-- (XPENDING then XCLAIM), so two workers can never both take the same entry.
--
-- Safe to run twice: a rerun finds nothing left under the dead consumer; the entry the first run took is
-- pending under the taker, and its next claim (claim.lua) returns it.
--
-- KEYS[1]  the job stream
-- KEYS[2]  stats hash
-- ARGV[1]  consumer group
-- ARGV[2]  the dead consumer
-- ARGV[3]  the consumer taking over
--
-- Returns false (nothing left), or {entry id, deliveries with this one, the entry's fields as a flat
-- list, or false if the entry was deleted meanwhile (it is then acknowledged)}.

local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #pending == 0 then
  redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
  return false
end
local id = pending[1][1]
local deliveries = pending[1][4] + 1
local entries = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, id)
redis.call('HINCRBY', KEYS[2], 'reclaimed', 1)
if #entries == 0 or not entries[1][2] then
  redis.call('XACK', KEYS[1], ARGV[1], id)
  return {id, deliveries, false}
end
return {id, deliveries, entries[1][2]}
