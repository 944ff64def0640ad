-- Record and announce a finished denoising step, if the worker still owns the running job.
--
-- KEYS[1]  job record hash
-- KEYS[2]  the webhooks' due set
-- KEYS[3]  the job's webhook hash (its outbox: a `progress` event, if the job asked for them)
-- ARGV[1]  worker id
-- ARGV[2]  step just finished
-- ARGV[3]  total steps
-- ARGV[4]  job events channel
-- ARGV[5]  job id
--
-- Returns the job's status (false for an unknown job); `cancelled` tells the worker its result will be
-- dropped.

-- @include webhook

local status = redis.call('HGET', KEYS[1], 'status')
if status == 'running' and redis.call('HGET', KEYS[1], 'worker') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'step', ARGV[2], 'total', ARGV[3])
  redis.call('PUBLISH', ARGV[4], cjson.encode({id = ARGV[5], type = 'progress',
                                               step = tonumber(ARGV[2]), total = tonumber(ARGV[3])}))
  webhook_due(KEYS[1], KEYS[2], KEYS[3], ARGV[5], 'progress')
end
return status or false
