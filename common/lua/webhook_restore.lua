-- Give a job back the webhook its record lost: Redis came back without the record (an older snapshot, a
-- failover), and a worker's result made it again, without the webhook. The gateway that accepted the job
-- (its journal) knows the webhook and runs this once it sees the job ended. A job that has ended gets its
-- `completed` message now.
--
-- Safe to run twice: a record that has its webhook is left as it is.
--
-- KEYS[1]  job record hash
-- KEYS[2]  the webhooks' due set
-- KEYS[3]  the job's webhook hash
-- ARGV[1]  job id
-- ARGV[2]  the webhook (JSON: url, events, key)
--
-- Returns 1 when the webhook was restored, 0 when the record has it (or is gone).

-- @include webhook

local status = redis.call('HGET', KEYS[1], 'status')
if not status or not webhook_keep(KEYS[1], ARGV[2]) then return 0 end
if status == 'succeeded' or status == 'failed' or status == 'cancelled' then
  webhook_due(KEYS[1], KEYS[2], KEYS[3], ARGV[1], 'completed')
end
return 1
