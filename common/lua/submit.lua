-- Submit a job: its record and its stream entry together.
--
-- With an idempotency key, at most one job per key: a replay of the key's job is answered before the
-- depth is looked at, and queues nothing. With a maximum depth, nothing is queued on a stream already
-- holding that many entries (queued or in service), checked here so that any number of gateways cannot
-- overshoot it. With a caller's in-flight set, the caller's own cap is checked here too (fair share).
-- Neither the record nor the key expires while the job is not terminal: the scripts that make it
-- terminal set their lifetimes. Nor does the caller's in-flight set: a job stays in it exactly as long
-- as it is unfinished (common/lua/include/settle.lua takes it out; an empty set is gone).
--
-- Safe to run twice (redis-py retries a call whose reply was lost): the job id is drawn before the call,
-- so a rerun finds this job's record and answers `created` again, queueing nothing.
--
-- KEYS[1]  job record hash
-- KEYS[2]  the job stream to queue on
-- KEYS[3]  set of every job stream
-- KEYS[4]  the webhooks' due set (its size is the outbox's depth, bounded by ARGV[11])
-- KEYS[5]  (optional) the idempotency key's string
-- KEYS[#KEYS] (when ARGV[7] > 0) the caller's in-flight sorted set (job ids by submit ms)
-- ARGV[1]  job (Job JSON)
-- ARGV[2]  (unused)
-- ARGV[3]  job id
-- ARGV[4]  request fingerprint (a digest of the request, compared on a replay)
-- ARGV[5]  maximum depth of the stream (0: none)
-- ARGV[6]  the job's owner, kept in its record ('' for none)
-- ARGV[7]  the caller's cap on jobs in flight (0: none, and no in-flight set is passed)
-- ARGV[8]  the prefix of job record keys (ARGV[8] .. id is a job's record), to prune the in-flight set
-- ARGV[9]  the job's webhook (JSON: url, events, key) or '' for none
-- ARGV[10] the events the webhook wants, as `,completed,started,` ('' for none)
-- ARGV[11] with a webhook, the most jobs with webhook messages due beyond which it is refused (0: no bound)
--
-- Returns {'created', "job-id fingerprint"}, {'existing', "job-id fingerprint" of the key's job},
-- {'full', depth}, {'busy', jobs the caller has in flight} or {'outbox-full', jobs with messages due}.

local cap = tonumber(ARGV[7])
local flight = cap > 0 and KEYS[#KEYS] or nil
local idempotency = #KEYS > (flight and 5 or 4) and KEYS[5] or nil
local claim = ARGV[3] .. ' ' .. ARGV[4]
if redis.call('EXISTS', KEYS[1]) == 1 then return {'created', claim} end
if idempotency then
  -- The key naming this very job without its record: Redis lost the record, and the job is queued again.
  local existing = redis.call('GET', idempotency)
  if existing and existing ~= claim then return {'existing', existing} end
end
-- Fair share: a caller holds at most ARGV[7] jobs queued or running. The job's end takes it out of its
-- caller's set (the record names the set); when the set looks full it is pruned too, of jobs whose record
-- Redis lost (restored from an older snapshot), so it never holds more than the cap.
if flight and redis.call('ZCARD', flight) >= cap then
  for _, id in ipairs(redis.call('ZRANGE', flight, 0, -1)) do
    local status = redis.call('HGET', ARGV[8] .. id, 'status')
    if status ~= 'queued' and status ~= 'running' then redis.call('ZREM', flight, id) end
  end
  local held = redis.call('ZCARD', flight)
  if held >= cap then return {'busy', held} end
end
local max_depth = tonumber(ARGV[5])
if max_depth > 0 then
  local depth = redis.call('XLEN', KEYS[2])
  if depth >= max_depth then return {'full', depth} end
end
-- A full outbox takes no more webhooks (a receiver is down, or slow): never drop a message already due.
local max_outbox = tonumber(ARGV[11])
if ARGV[9] ~= '' and max_outbox > 0 then
  local outbox = redis.call('ZCARD', KEYS[4])
  if outbox >= max_outbox then return {'outbox-full', outbox} end
end
local entry = redis.call('XADD', KEYS[2], '*', 'job', ARGV[1])
redis.call('SADD', KEYS[3], KEYS[2])
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('HSET', KEYS[1], 'job', ARGV[1], 'status', 'queued', 'entry', entry, 'stream', KEYS[2], 'created', ms)
redis.call('HSET', KEYS[1], 'owner', ARGV[6])
if ARGV[9] ~= '' then redis.call('HSET', KEYS[1], 'webhook', ARGV[9], 'webhook_events', ARGV[10]) end
if flight then
  redis.call('ZADD', flight, ms, ARGV[3])
  redis.call('PERSIST', flight)  -- a set from an older release had a lifetime: no longer
  redis.call('HSET', KEYS[1], 'in_flight', flight)
end
if idempotency then
  redis.call('SET', idempotency, claim)
  redis.call('HSET', KEYS[1], 'idempotency', idempotency)
end
return {'created', claim}
