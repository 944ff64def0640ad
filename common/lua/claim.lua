-- Claim for one consumer without waiting: first an entry already pending under it that it is not working
-- on, then a new entry, each stream in order of preference.
--
-- An entry pending under a consumer that asks for work, and that it does not name as in hand, is one it
-- lost: the reply that delivered it was lost (redis-py retries with `>` and reads past it), a take-over's
-- reply was lost, or Redis came back from an older snapshot. Without this it would stay pending under a
-- live worker for ever. It is taken again with XCLAIM, which counts a delivery; the entries in hand are
-- not touched (their delivery counts stay as they are). An own pending entry that was deleted (its job
-- was cancelled) is acknowledged on the way.
--
-- Safe to run twice: the entry a lost first run delivered is pending under the consumer, and returned.
--
-- KEYS[1]  the first stream to read, then KEYS[2], ...: the streams in order of preference
-- ARGV[1]  consumer group
-- ARGV[2]  consumer
-- ARGV[3..] the entries the consumer has in hand, each as "stream entry-id": never returned
--
-- Returns false, or {stream, entry id, fields, deliveries by this stream's group}.

local in_hand = {}
for i = 3, #ARGV do in_hand[ARGV[i]] = true end
for i = 1, #KEYS do
  for _, pending in ipairs(redis.call('XPENDING', KEYS[i], ARGV[1], '-', '+', 100, ARGV[2])) do
    local id = pending[1]
    if not in_hand[KEYS[i] .. ' ' .. id] then
      local entry = redis.call('XCLAIM', KEYS[i], ARGV[1], ARGV[2], 0, id)[1]
      if entry and entry[2] then return {KEYS[i], id, entry[2], pending[4] + 1} end
      redis.call('XACK', KEYS[i], ARGV[1], id)
    end
  end
end
for i = 1, #KEYS do
  local reply = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', 1, 'STREAMS', KEYS[i], '>')
  if reply then
    local entry = reply[1][2][1]
    return {KEYS[i], entry[1], entry[2], 1}
  end
end
return false
