-- Record one delivery attempt of the head message of a job's outbox, if the caller still holds the lease
-- it was taken under: `delivered` and `gave-up` end the message (the next one, if any, is due at once),
-- `retry` makes the job due again after ARGV[6] ms. `skip` is no attempt: the gateway cannot send the
-- message (it lacks the signing secret, or the allow-listing, the message needs) and leaves it, due again
-- after ARGV[6] ms, to any gateway; the message counts its skips.
--
-- Safe to run twice: a rerun finds its lease gone and changes nothing. So does a gateway whose lease ran out
-- (another gateway took the message, and its attempt is the one recorded).
--
-- KEYS[1]  the webhooks' due set
-- KEYS[2]  the job's webhook hash
-- ARGV[1]  lease token
-- ARGV[2]  job id
-- ARGV[3]  outcome: delivered, retry, gave-up or skip
-- ARGV[4]  the receiver's HTTP status ('' for none: no answer)
-- ARGV[5]  what went wrong ('' for nothing)
-- ARGV[6]  with retry or skip, ms until the message is due again
-- ARGV[7]  seconds the hash lives once its outbox is empty
-- ARGV[8]  the message's body, kept for its next attempts ('' to keep what is kept)
--
-- Returns 'stale' (the lease is not the caller's) or the outcome.

if redis.call('HGET', KEYS[2], 'lease') ~= ARGV[1] then return 'stale' end
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local queue = redis.call('HGET', KEYS[2], 'queue') or ''
local head, rest = string.match(queue, '^(%S+)%s*(.*)$')
local state = cjson.decode(redis.call('HGET', KEYS[2], 'm:' .. head))
if ARGV[3] == 'skip' then
  redis.call('HDEL', KEYS[2], 'lease')
  state.skips = (state.skips or 0) + 1
  state.next_ms = ms + tonumber(ARGV[6])
  redis.call('HSET', KEYS[2], 'm:' .. head, cjson.encode(state))
  redis.call('ZADD', KEYS[1], state.next_ms, ARGV[2])
  return 'skip'
end
state.attempts = state.attempts + 1
state.last_attempt_ms = ms
state.last_status = tonumber(ARGV[4])
state.last_error = ARGV[5] ~= '' and ARGV[5] or nil
redis.call('HDEL', KEYS[2], 'lease')
if ARGV[3] == 'retry' then
  state.next_ms = ms + tonumber(ARGV[6])
  redis.call('HSET', KEYS[2], 'm:' .. head, cjson.encode(state))
  if ARGV[8] ~= '' then redis.call('HSETNX', KEYS[2], 'b:' .. head, ARGV[8]) end
  redis.call('ZADD', KEYS[1], state.next_ms, ARGV[2])
  return 'retry'
end
state.next_ms = nil
if ARGV[3] == 'delivered' then state.delivered_ms = ms else state.gave_up_ms = ms end
redis.call('HSET', KEYS[2], 'm:' .. head, cjson.encode(state), 'queue', rest)
redis.call('HDEL', KEYS[2], 'b:' .. head)
if rest ~= '' then
  redis.call('ZADD', KEYS[1], ms, ARGV[2])
else
  redis.call('ZREM', KEYS[1], ARGV[2])
  redis.call('EXPIRE', KEYS[2], ARGV[7])
end
return ARGV[3]
