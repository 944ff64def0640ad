-- Store a finished job's result, announce it, then settle its stream entry, if this delivery may: the job
-- is not terminal, and this delivery is its current attempt (or none was started). The terminal state
-- lives in the record, which outlives the images, so a job never gets a second result, not even after its
-- images expired, and never one over a cancellation. A missing record is one that expired after the job
-- finished (refused), unless the job is younger than a record's lifetime: then Redis lost it (restored
-- from an older snapshot) and the result is stored.
--
-- Safe to run twice: a rerun after this attempt's result was stored answers 'stored' and changes nothing.
--
-- KEYS[1]  result hash of the job (meta, image:0, image:1, ...)
-- KEYS[2]  the job stream the entry is on
-- KEYS[3]  job record hash
-- KEYS[4]  stats hash (cluster-wide counters)
-- KEYS[5]  attempts list
-- KEYS[6]  the webhooks' due set
-- KEYS[7]  the job's webhook hash (its outbox)
-- ARGV[1]  consumer group
-- ARGV[2]  stream entry id
-- ARGV[3]  ttl of the result and the idempotency key, seconds
-- ARGV[4]  ttl of the record and the attempts, seconds (longer)
-- ARGV[5]  completions channel
-- ARGV[6]  job id (published on the channel)
-- ARGV[7]  result metadata (JobResult JSON)
-- ARGV[8]  the job's final status (succeeded, failed)
-- ARGV[9]  attempt token of the delivery ('': not fenced, for an entry that does not parse)
-- ARGV[10] when the job was first queued (Redis ms)
-- ARGV[11] the job's webhook as the job carries it (JSON, '' for none): kept should the record be lost
-- ARGV[12..] encoded images, in order
--
-- Returns 'stored' (this attempt's result is the job's, now or by an earlier run of this call),
-- 'duplicate' (the job was already terminal: the entry is settled and the result counted in
-- duplicate_results or discarded_after_cancel) or 'stale' (another attempt holds the job: the entry is
-- left to it, and the result counted in stale_results).

-- @include webhook
-- @include settle

local function settle()
  redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
  redis.call('XDEL', KEYS[2], ARGV[2])
end

local status = redis.call('HGET', KEYS[3], 'status')
local fenced = ARGV[9] ~= ''
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local could_have_expired = now_ms - tonumber(ARGV[10]) > tonumber(ARGV[4]) * 1000
if terminal(status) or (fenced and not status and could_have_expired) then
  settle()
  if status and redis.call('HGET', KEYS[3], 'settled') == ARGV[9] then return 'stored' end
  local counter = 'duplicate_results'
  if status == 'cancelled' then counter = 'discarded_after_cancel' end
  redis.call('HINCRBY', KEYS[4], counter, 1)
  return 'duplicate'
end
local holder = redis.call('HGET', KEYS[3], 'token')
if fenced and holder and holder ~= ARGV[9] then
  redis.call('HINCRBY', KEYS[4], 'stale_results', 1)
  return 'stale'
end
finish(ARGV[8], ARGV[9], ARGV[7], 12, ARGV[11])
settle()
return 'stored'
