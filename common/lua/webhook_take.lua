-- Take up to ARGV[3] webhook messages that are due, one per job (the head of its outbox), each under a
-- lease: its job's due time moves to the lease's end, so no other gateway takes it meanwhile, and should
-- this gateway die, another takes it then. A job whose outbox is empty leaves the due set.
--
-- Safe to run twice: a rerun takes nothing the first run leased (their due times are in the future), and
-- what the first run leased is taken again once its lease ends.
--
-- KEYS[1]  the webhooks' due set
-- ARGV[1]  lease, ms
-- ARGV[2]  this gateway's lease token prefix (the token is ARGV[2] .. ':' .. now ms)
-- ARGV[3]  how many messages at most
-- ARGV[4]  prefix of the jobs' webhook hashes (ARGV[4] .. job id)
--
-- Returns {now ms, {job id, lease token, message state JSON, spec JSON, body or false}, ...}.

local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local out = {ms}
local token = ARGV[2] .. ':' .. ms
for _, job_id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ms, 'LIMIT', 0, tonumber(ARGV[3]))) do
  local hook = ARGV[4] .. job_id
  local head = string.match(redis.call('HGET', hook, 'queue') or '', '^(%S+)')
  local state = head and redis.call('HGET', hook, 'm:' .. head)
  if not state then
    redis.call('ZREM', KEYS[1], job_id)
  else
    redis.call('ZADD', KEYS[1], ms + tonumber(ARGV[1]), job_id)
    redis.call('HSET', hook, 'lease', token)
    if redis.call('HGET', hook, 'pending_progress') == head then redis.call('HDEL', hook, 'pending_progress') end
    table.insert(out, {job_id, token, state, redis.call('HGET', hook, 'spec') or '{}',
                       redis.call('HGET', hook, 'b:' .. head) or false})
  end
end
return out
