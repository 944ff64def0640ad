-- Included by the scripts that end a job (cancel, store_result, dead_letter), which share its KEYS and
-- ARGV layout: KEYS[1] result, KEYS[3] job record, KEYS[5] attempt history; ARGV[3] result TTL, ARGV[4]
-- record TTL, ARGV[5] completions channel, ARGV[6] job id; KEYS[6] the webhooks' due set, KEYS[7] the job's
-- webhook hash (include webhook first).

local function terminal(status)
  return status == 'succeeded' or status == 'failed' or status == 'cancelled'
end

-- Make the job terminal: its result (images from ARGV[first_image] on), the record's status (and its
-- webhook, `webhook`, should Redis have lost the record that had it) and the
-- attempt that settled it, lifetimes counted from now (the record and the history outlive the images), the
-- job out of its caller's in-flight set,
-- its webhook's `completed` event made due (in this same script: a result is never seen without it), and
-- the announcement.
local function finish(status, settled, meta, first_image, webhook)
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'meta', meta)
  for i = first_image, #ARGV do
    redis.call('HSET', KEYS[1], 'image:' .. (i - first_image), ARGV[i])
  end
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  redis.call('HSET', KEYS[3], 'status', status, 'settled', settled)
  redis.call('EXPIRE', KEYS[3], ARGV[4])
  local key = redis.call('HGET', KEYS[3], 'idempotency')
  if key then redis.call('EXPIRE', key, ARGV[3]) end
  redis.call('EXPIRE', KEYS[5], ARGV[4])
  -- Out of its caller's in-flight set (submit.lua), which has no lifetime: it holds unfinished jobs only.
  local flight = redis.call('HGET', KEYS[3], 'in_flight')
  if flight then redis.call('ZREM', flight, ARGV[6]) end
  webhook_keep(KEYS[3], webhook)
  webhook_due(KEYS[3], KEYS[6], KEYS[7], ARGV[6], 'completed')
  redis.call('PUBLISH', ARGV[5], ARGV[6])
end
