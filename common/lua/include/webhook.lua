-- Included by the scripts that make a webhook event due: those that end a job (through settle), start.lua
-- and progress.lua. A job asked for a webhook when its record holds `webhook` (the spec, JSON) and
-- `webhook_events` (`,completed,started,`).
--
-- The job's webhook hash (common/rediskeys.py `webhook`) is its outbox: `queue` (message ids, oldest first,
-- space-separated: they are delivered in this order, one at a time), `seq`, `spec`, `lease` (the token of
-- the gateway delivering the head), `m:<id>` (a message's state, JSON), `b:<id>` (its body, once built),
-- `started` (a started event was made due once), `pending_progress` (a progress message not taken yet).
-- The due set scores each job with a message to send by when it may next be taken (Redis ms).
--
-- webhook_keep(record, spec) gives a record its webhook (the spec, JSON) unless it has one: a record Redis
-- lost and a script made again knows of none.
--
-- webhook_due makes `event` of job `job_id` due, if its record asked for it. A progress message not yet
-- taken is not doubled (its body is built when it is taken, with the latest step); a job's completion
-- drops it.

local function webhook_keep(record, spec)
  if spec == nil or spec == '' or redis.call('HEXISTS', record, 'webhook') == 1 then return false end
  local events = cjson.decode(spec).events
  redis.call('HSET', record, 'webhook', spec, 'webhook_events', ',' .. table.concat(events, ',') .. ',')
  return true
end

local function webhook_due(record, due, hook, job_id, event)
  local events = redis.call('HGET', record, 'webhook_events')
  if not events or not string.find(events, ',' .. event .. ',', 1, true) then return end
  local pending = redis.call('HGET', hook, 'pending_progress')
  if event == 'progress' and pending then return end
  if event == 'started' then
    if redis.call('HSETNX', hook, 'started', '1') == 0 then return end
  end
  local queue = redis.call('HGET', hook, 'queue') or ''
  if event == 'completed' and pending then
    queue = string.gsub(' ' .. queue .. ' ', ' ' .. pending .. ' ', ' ')
    queue = string.gsub(string.gsub(queue, '^ +', ''), ' +$', '')
    redis.call('HDEL', hook, 'm:' .. pending, 'pending_progress')
  end
  local now = redis.call('TIME')
  local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  local id = 'msg_' .. job_id .. '_' .. redis.call('HINCRBY', hook, 'seq', 1)
  if event == 'progress' then redis.call('HSET', hook, 'pending_progress', id) end
  if queue == '' then queue = id else queue = queue .. ' ' .. id end
  redis.call('HSET', hook, 'queue', queue, 'spec', redis.call('HGET', record, 'webhook'),
             'm:' .. id, cjson.encode({id = id, event = event, attempts = 0, created_ms = ms}))
  redis.call('PERSIST', hook)
  redis.call('ZADD', due, 'NX', ms, job_id)
end
