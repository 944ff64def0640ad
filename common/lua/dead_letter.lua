-- Give up on a job: record it with its history on the dead-letter stream and make it terminal as failed,
-- then settle its entry. The dead-letter stream is bounded (about ARGV[11] entries, none older than the
-- job's result ttl by Redis's clock: a worker whose clock runs ahead must not wipe it) and expires that long
-- after its last entry.
--
-- Safe to run twice: a rerun (or a job already terminal) only settles the entry.
--
-- KEYS[1]  result hash of the job
-- KEYS[2]  the job stream the entry is on
-- KEYS[3]  job record hash
-- KEYS[4]  stats hash
-- KEYS[5]  attempts list
-- KEYS[6]  the webhooks' due set
-- KEYS[7]  the job's webhook hash (its outbox)
-- KEYS[8]  dead-letter stream
-- ARGV[1]  consumer group
-- ARGV[2]  stream entry id
-- ARGV[3]  ttl of the result and the idempotency key, seconds
-- ARGV[4]  ttl of the record and the attempts, seconds (longer)
-- ARGV[5]  completions channel
-- ARGV[6]  job id
-- ARGV[7]  the failed result's metadata (JobResult JSON)
-- ARGV[8]  the job as the dead-letter stream keeps it (JSON, its prompts replaced by their lengths)
-- ARGV[9]  how many times it was delivered, on every stream it was on
-- ARGV[10] why it was given up
-- ARGV[11] about how many entries the dead-letter stream keeps
--
-- Returns 1 when this call dead-lettered the job, 0 when it was terminal already.

-- @include webhook
-- @include settle

redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
if terminal(redis.call('HGET', KEYS[3], 'status')) then return 0 end
local history = redis.call('LRANGE', KEYS[5], 0, -1)
local attempts = '[]'
if #history > 0 then attempts = cjson.encode(history) end
redis.call('XADD', KEYS[8], 'MAXLEN', '~', ARGV[11], '*', 'job', ARGV[8], 'entry_id', ARGV[2],
           'deliveries', ARGV[9], 'attempts', attempts, 'reason', ARGV[10])
local now = redis.call('TIME')
redis.call('XTRIM', KEYS[8], 'MINID', string.format('%.0f-0', (tonumber(now[1]) - tonumber(ARGV[3])) * 1000))
redis.call('EXPIRE', KEYS[8], ARGV[3])
redis.call('HINCRBY', KEYS[4], 'dead_lettered', 1)
-- The job's webhook, as the job carries it, for a record Redis lost (made again here without it).
local ok, job = pcall(cjson.decode, ARGV[8])
local webhook = ok and type(job) == 'table' and type(job.webhook) == 'string' and job.webhook or nil
finish('failed', 'dead-letter', ARGV[7], #ARGV + 1, webhook)
return 1
