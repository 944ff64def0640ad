-- One rate-limit check (GCRA): count a request against a bucket that stores the theoretical arrival time
-- (TAT, Redis ms) of its next request, on the Redis server's clock. The key expires once the bucket is
-- full again.
--
-- KEYS[1]  the bucket
-- ARGV[1]  emission interval, ms (the period of the sustained rate)
-- ARGV[2]  burst, requests
--
-- Returns {allowed 0|1, ms until allowed (0 when allowed), requests left now, ms until the bucket is
-- full}.

local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local tat = now
local stored = redis.call('GET', KEYS[1])
if stored then tat = math.max(tonumber(stored), now) end
local new_tat = tat + interval
local allow_at = new_tat - burst * interval
if now < allow_at then
  return {0, math.ceil(allow_at - now), 0, math.ceil(tat - now)}
end
redis.call('SET', KEYS[1], string.format('%.3f', new_tat), 'PX', math.ceil(new_tat - now))
return {1, 0, math.floor((now - allow_at) / interval), math.ceil(new_tat - now)}
