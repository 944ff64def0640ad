-- Cancel a job that has no result yet: store a `cancelled` result (so a worker's later one is dropped),
-- take its entry off the stream (a queued job is never delivered) and announce it.
--
-- KEYS[1]  job record hash
-- KEYS[2]  result hash
-- KEYS[3]  the job stream its entry is on
-- KEYS[4]  stats hash
-- ARGV[1]  ttl of the cancelled result, seconds
-- ARGV[2]  completions channel
-- ARGV[3]  job id
-- ARGV[4]  result metadata (JobResult JSON, status cancelled)
--
-- Returns false for an unknown job, 'cancelled-now', or the status of a job that already finished (or
-- was cancelled before).

local status = redis.call('HGET', KEYS[1], 'status')
if not status then return false end
if status == 'cancelled' or redis.call('EXISTS', KEYS[2]) == 1 then return status end
redis.call('HSET', KEYS[2], 'meta', ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[1], 'status', 'cancelled')
local entry = redis.call('HGET', KEYS[1], 'entry')
if entry then redis.call('XDEL', KEYS[3], entry) end
redis.call('HINCRBY', KEYS[4], 'cancelled', 1)
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 'cancelled-now'
