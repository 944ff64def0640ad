-- Store a finished job's result (the first result wins), announce it, then settle its stream entry.
--
-- A later result for a job that already has one is dropped and counted: `discarded_after_cancel` when
-- the job was cancelled, `duplicate_results` otherwise. Whatever happened, the entry is acknowledged and
-- deleted, so it is never delivered again.
--
-- KEYS[1]  result hash of the job (meta, image:0, image:1, ...)
-- KEYS[2]  the job stream the entry is on
-- KEYS[3]  job record hash
-- KEYS[4]  stats hash (cluster-wide counters)
-- ARGV[1]  consumer group
-- ARGV[2]  stream entry id
-- ARGV[3]  ttl of the result and the record, seconds
-- ARGV[4]  completions channel
-- ARGV[5]  job id (published on the channel)
-- ARGV[6]  result metadata (JobResult JSON)
-- ARGV[7]  the job's final status (succeeded, failed, cancelled)
-- ARGV[8..] encoded images, in order
--
-- Returns 1 if this result was stored, 0 if it was dropped.

local stored = 0
if redis.call('EXISTS', KEYS[1]) == 1 then
  if redis.call('HGET', KEYS[3], 'status') == 'cancelled' then
    redis.call('HINCRBY', KEYS[4], 'discarded_after_cancel', 1)
  else
    redis.call('HINCRBY', KEYS[4], 'duplicate_results', 1)
  end
else
  redis.call('HSET', KEYS[1], 'meta', ARGV[6])
  for i = 8, #ARGV do
    redis.call('HSET', KEYS[1], 'image:' .. (i - 8), ARGV[i])
  end
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  redis.call('HSET', KEYS[3], 'status', ARGV[7])
  redis.call('EXPIRE', KEYS[3], ARGV[3])
  redis.call('PUBLISH', ARGV[4], ARGV[5])
  stored = 1
end
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
return stored
