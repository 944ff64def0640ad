-- Cancel a job that is not terminal: make it terminal as `cancelled` (so a worker's later result is
-- refused), take its entry off the stream (a queued job is never delivered) and announce it.
--
-- Safe to run twice: a rerun finds the job terminal and answers its status.
--
-- KEYS[1]  result hash of the job
-- KEYS[2]  the job stream its entry is on
-- KEYS[3]  job record hash
-- KEYS[4]  stats hash
-- KEYS[5]  attempts list
-- KEYS[6]  the webhooks' due set
-- KEYS[7]  the job's webhook hash (its outbox)
-- ARGV[1]  (unused)
-- ARGV[2]  (unused)
-- ARGV[3]  ttl of the result and the idempotency key, seconds
-- ARGV[4]  ttl of the record and the attempts, seconds (longer)
-- ARGV[5]  completions channel
-- ARGV[6]  job id
-- ARGV[7]  the cancelled result's metadata (JobResult JSON)
--
-- Returns false for an unknown job, 'cancelled-now', or the status of a job already terminal.

-- @include webhook
-- @include settle

local status = redis.call('HGET', KEYS[3], 'status')
if not status then return false end
if terminal(status) then return status end
local entry = redis.call('HGET', KEYS[3], 'entry')
if entry then redis.call('XDEL', KEYS[2], entry) end
finish('cancelled', 'cancelled', ARGV[7], #ARGV + 1)
redis.call('HINCRBY', KEYS[4], 'cancelled', 1)
return 'cancelled-now'
