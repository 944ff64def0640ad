-- A worker starts a delivered job: this delivery's attempt token becomes the job's current attempt (the
-- only one whose result will be stored), the job is recorded as running on that worker, the delivery is
-- appended to the job's history, and announced.
--
-- Safe to run twice: a rerun with the same token returns the same start time and changes nothing.
--
-- KEYS[1]  job record hash
-- KEYS[2]  attempts list (`worker-id@redis-ms` per delivery)
-- KEYS[3]  the webhooks' due set
-- KEYS[4]  the job's webhook hash (its outbox: a `started` event, once per job, if it asked for one)
-- ARGV[1]  worker id
-- ARGV[2]  job events channel
-- ARGV[3]  job id
-- ARGV[4]  attempt token (stream, entry id and delivery count of this delivery)
--
-- Returns the Redis server time in ms, or -1 when the job is terminal (cancelled, or finished by another
-- attempt): the worker skips it.

-- @include webhook

local status = redis.call('HGET', KEYS[1], 'status')
if status == 'succeeded' or status == 'failed' or status == 'cancelled' then return -1 end
if status == 'running' and redis.call('HGET', KEYS[1], 'token') == ARGV[4] then
  return tonumber(redis.call('HGET', KEYS[1], 'started')) or 0
end
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[1], 'token', ARGV[4], 'started', ms)
redis.call('HDEL', KEYS[1], 'step', 'total')
redis.call('RPUSH', KEYS[2], ARGV[1] .. '@' .. ms)
redis.call('PUBLISH', ARGV[2], cjson.encode({id = ARGV[3], type = 'started', worker = ARGV[1]}))
webhook_due(KEYS[1], KEYS[3], KEYS[4], ARGV[3], 'started')
return ms
