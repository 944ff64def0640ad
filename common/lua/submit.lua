-- Submit a job: its record and its stream entry together.
--
-- With an idempotency key, at most one job per key: a replay of the key's job is answered before the
-- depth is looked at, and queues nothing. With a maximum depth, nothing is queued on a stream already
-- holding that many entries (queued or in service), checked here so that any number of gateways cannot
-- overshoot it. With a caller's in-flight set, the caller's own cap is checked here too (fair share).
--
-- KEYS[1]  job record hash
-- KEYS[2]  the job stream to queue on
-- KEYS[3]  set of every job stream
-- KEYS[4]  (optional) the idempotency key's string
-- KEYS[#KEYS] (when ARGV[7] > 0) the caller's in-flight sorted set (job ids by submit ms)
-- ARGV[1]  job (Job JSON)
-- ARGV[2]  ttl of the record, the idempotency key and the in-flight set, seconds
-- ARGV[3]  job id
-- ARGV[4]  request fingerprint (a digest of the request, compared on a replay)
-- ARGV[5]  maximum depth of the stream (0: none)
-- ARGV[6]  the job's owner, kept in its record ('' for none)
-- ARGV[7]  the caller's cap on jobs in flight (0: none, and no in-flight set is passed)
-- ARGV[8]  the prefix of job record keys (ARGV[8] .. id is a job's record), to prune the in-flight set
--
-- Returns {'created', "job-id fingerprint"}, {'existing', "job-id fingerprint" of the key's job},
-- {'full', depth} or {'busy', jobs the caller has in flight}.

local cap = tonumber(ARGV[7])
local flight = cap > 0 and KEYS[#KEYS] or nil
local idempotency = #KEYS > (flight and 4 or 3) and KEYS[4] or nil
if idempotency then
  local existing = redis.call('GET', idempotency)
  if existing then return {'existing', existing} end
end
-- Fair share: a caller holds at most ARGV[7] jobs queued or running. Its set is pruned of finished and
-- expired jobs only when it looks full, so it never holds more than the cap, and no other script has to
-- remove anything from it.
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
local entry = redis.call('XADD', KEYS[2], '*', 'job', ARGV[1])
redis.call('SADD', KEYS[3], KEYS[2])
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('HSET', KEYS[1], 'job', ARGV[1], 'status', 'queued', 'entry', entry, 'stream', KEYS[2], 'created', ms)
redis.call('HSET', KEYS[1], 'owner', ARGV[6])
redis.call('EXPIRE', KEYS[1], ARGV[2])
if flight then
  redis.call('ZADD', flight, ms, ARGV[3])
  redis.call('EXPIRE', flight, ARGV[2])
end
local claim = ARGV[3] .. ' ' .. ARGV[4]
if idempotency then redis.call('SET', idempotency, claim, 'EX', ARGV[2]) end
return {'created', claim}
