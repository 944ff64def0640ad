-- Move one entry of a departed worker's stream to the shared stream of its shape, keeping its enqueue
-- time and counting a delivery if it was in service; a cancelled or finished job is only dropped.
--
-- Safe to run twice: a rerun finds the entry gone from the departed worker's stream and returns 0.
--
-- KEYS[1]  the departed worker's stream
-- KEYS[2]  the shared stream of the job's shape
-- KEYS[3]  job record hash
-- ARGV[1]  consumer group
-- ARGV[2]  stream entry id
--
-- Returns 1 if the job was moved, 0 otherwise.

local entries = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
if #entries == 0 then return 0 end
local fields = entries[1][2]
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
local status = redis.call('HGET', KEYS[3], 'status')
if status ~= 'queued' and status ~= 'running' then return 0 end
local out = {}
local deliveries, enqueued = 0, string.match(ARGV[2], '^(%d+)')
for i = 1, #fields, 2 do
  if fields[i] == 'deliveries' then deliveries = tonumber(fields[i + 1])
  elseif fields[i] == 'enqueued' then enqueued = fields[i + 1]
  else table.insert(out, fields[i]); table.insert(out, fields[i + 1]) end
end
if #pending > 0 then deliveries = deliveries + pending[1][4] end
table.insert(out, 'deliveries'); table.insert(out, tostring(deliveries))
table.insert(out, 'enqueued'); table.insert(out, enqueued)
local entry = redis.call('XADD', KEYS[2], '*', unpack(out))
redis.call('HSET', KEYS[3], 'status', 'queued', 'entry', entry, 'stream', KEYS[2])
return 1
