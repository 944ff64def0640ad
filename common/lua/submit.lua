-- Submit a job: its record and its stream entry together.
--
-- With an idempotency key, at most one job per key: a replay of the key's job is answered before the
-- depth is looked at, and queues nothing. With a maximum depth, nothing is queued on a stream already
-- holding that many entries (queued or in service), checked here so that any number of gateways cannot
-- overshoot it. Neither the record nor the key expires while the job is not terminal: the scripts that
-- make it terminal set their lifetimes.
--
-- Safe to run twice (redis-py retries a call whose reply was lost): the job id is drawn before the call,
-- so a rerun finds this job's record and answers `created` again, queueing nothing.
--
-- KEYS[1]  job record hash
-- KEYS[2]  the job stream to queue on
-- KEYS[3]  set of every job stream
-- KEYS[4]  (optional) the idempotency key's string
-- ARGV[1]  job (Job JSON)
-- ARGV[2]  job id
-- ARGV[3]  request fingerprint (a digest of the request, compared on a replay)
-- ARGV[4]  maximum depth of the stream (0: none)
--
-- Returns {'created', "job-id fingerprint"}, {'existing', "job-id fingerprint" of the key's job}, or
-- {'full', depth}.

local claim = ARGV[2] .. ' ' .. ARGV[3]
if redis.call('EXISTS', KEYS[1]) == 1 then return {'created', claim} end
if KEYS[4] then
  local existing = redis.call('GET', KEYS[4])
  if existing then return {'existing', existing} end
end
local max_depth = tonumber(ARGV[4])
if max_depth > 0 then
  local depth = redis.call('XLEN', KEYS[2])
  if depth >= max_depth then return {'full', depth} end
end
local entry = redis.call('XADD', KEYS[2], '*', 'job', ARGV[1])
redis.call('SADD', KEYS[3], KEYS[2])
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('HSET', KEYS[1], 'job', ARGV[1], 'status', 'queued', 'entry', entry, 'stream', KEYS[2], 'created', ms)
if KEYS[4] then
  redis.call('SET', KEYS[4], claim)
  redis.call('HSET', KEYS[1], 'idempotency', KEYS[4])
end
return {'created', claim}
