-- Claim for one consumer without waiting, up to a budget of rows (images): first the entries already pending
-- under it that it is not working on, then new entries, each stream in order of preference.
--
-- A job's rows are its `params.n` (4, the default batch, when it names none; 1 for an entry whose job does
-- not parse: it is settled at once). Entries are taken in order while they fit the rows left; the first
-- that does not fit ends the claim (so it is the next one this worker takes once it has room: no stream of
-- smaller jobs overtakes it for ever). A claim never takes more rows than the budget, except that it takes
-- one job when the budget is > 0 and the first job found is larger (the engine holds it until its rows
-- are free).
--
-- An entry pending under a consumer that asks for work, and that it does not name as in hand, is one it
-- lost: the reply that delivered it was lost (redis-py retries with `>` and reads past it), a take-over's
-- reply was lost, or Redis came back from an older snapshot. Without this it would stay pending under a
-- live worker for ever. It is taken again with XCLAIM, which counts a delivery; the entries in hand are
-- not touched (their delivery counts stay as they are). An own pending entry that was deleted (its job
-- was cancelled) is acknowledged on the way. A new entry is looked at (XRANGE after the group's last
-- delivered id) before it is read, so one that does not fit stays undelivered for other consumers.
--
-- Safe to run twice: the entries a lost first run delivered are pending under the consumer, not in hand,
-- and the rerun, with the same budget, returns the same entries (each counted one delivery more).
--
-- KEYS[1]  the first stream to read, then KEYS[2], ...: the streams in order of preference
-- ARGV[1]  consumer group
-- ARGV[2]  consumer
-- ARGV[3]  the budget: rows the consumer has free (at least one entry is taken when it is > 0)
-- ARGV[4..] the entries the consumer has in hand, each as "stream entry-id": never returned
--
-- Returns a list (empty when there is nothing) of {stream, entry id, fields, deliveries by this stream's
-- group}.

local DEFAULT_ROWS = 4

local function rows_of(fields)
  for i = 1, #fields, 2 do
    if fields[i] == 'job' then
      local ok, job = pcall(cjson.decode, fields[i + 1])
      if not ok or type(job) ~= 'table' or type(job.params) ~= 'table' then return 1 end
      local n = tonumber(job.params.n)
      if n == nil then return DEFAULT_ROWS end
      return math.max(1, math.floor(n))
    end
  end
  return 1
end

local group, consumer = ARGV[1], ARGV[2]
local left = tonumber(ARGV[3])
local taken = {}
local blocked = false -- an entry did not fit: take nothing after it
local in_hand = {}
for i = 4, #ARGV do in_hand[ARGV[i]] = true end

-- Whether a job of `rows` rows is taken: it fits what is left, or nothing is taken yet. One that is not
-- blocks the rest of the claim.
local function fits(rows)
  if not blocked and left > 0 and (rows <= left or #taken == 0) then return true end
  blocked = true
  return false
end

local function take(stream, id, fields, deliveries)
  left = left - rows_of(fields)
  taken[#taken + 1] = {stream, id, fields, deliveries}
end

local function lost_entries(stream)
  for _, pending in ipairs(redis.call('XPENDING', stream, group, '-', '+', 100, consumer)) do
    local id = pending[1]
    if left <= 0 or blocked then return end
    if not in_hand[stream .. ' ' .. id] then
      local entry = redis.call('XRANGE', stream, id, id)[1]
      if not entry or not entry[2] then
        redis.call('XCLAIM', stream, group, consumer, 0, id)
        redis.call('XACK', stream, group, id)
      elseif fits(rows_of(entry[2])) then
        redis.call('XCLAIM', stream, group, consumer, 0, id)
        take(stream, id, entry[2], pending[4] + 1)
      end
    end
  end
end

-- The entry a read with `>` would deliver next, without delivering it (nil when there is none).
local function next_new(stream)
  local groups = redis.pcall('XINFO', 'GROUPS', stream)
  if type(groups) ~= 'table' or groups.err then return nil end
  for _, info in ipairs(groups) do
    local fields = {}
    for i = 1, #info, 2 do fields[info[i]] = info[i + 1] end
    if fields['name'] == group then
      return redis.call('XRANGE', stream, '(' .. fields['last-delivered-id'], '+', 'COUNT', 1)[1]
    end
  end
  return nil
end

local function new_entries(stream)
  while left > 0 and not blocked do
    local peek = next_new(stream)
    if peek and not fits(rows_of(peek[2])) then return end
    local reply = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', 1, 'STREAMS', stream, '>')
    if not reply then return end
    local entry = reply[1][2][1]
    take(stream, entry[1], entry[2], 1)
  end
end

for i = 1, #KEYS do lost_entries(KEYS[i]) end
for i = 1, #KEYS do new_entries(KEYS[i]) end
return taken
