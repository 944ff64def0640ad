-- A worker starts a delivered job: record it as running on that worker, append the delivery to the
-- job's history, and announce it.
--
-- KEYS[1]  job record hash
-- KEYS[2]  attempts list (`worker-id@redis-ms` per delivery)
-- KEYS[3]  result hash
-- ARGV[1]  worker id
-- ARGV[2]  ttl of the record and the attempts, seconds
-- ARGV[3]  job events channel
-- ARGV[4]  job id
--
-- Returns the Redis server time in ms, or -1 when the job was cancelled or already has a result: the
-- worker skips it.

if redis.call('HGET', KEYS[1], 'status') == 'cancelled' or redis.call('EXISTS', KEYS[3]) == 1 then
  return -1
end
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[1])
redis.call('HDEL', KEYS[1], 'step', 'total')
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('RPUSH', KEYS[2], ARGV[1] .. '@' .. ms)
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('PUBLISH', ARGV[3], cjson.encode({id = ARGV[4], type = 'started', worker = ARGV[1]}))
return ms
