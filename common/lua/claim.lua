-- Claim for one consumer without waiting: first an entry already pending under it, then a new entry,
-- each stream in order of preference.
--
-- An entry pending under a consumer that asks for work is one it is not working on (a worker claims only
-- with no job in hand): the reply that delivered it was lost (redis-py retries with `>` and reads past
-- it), a take-over's reply was lost, or Redis came back from an older snapshot. Without this it would
-- stay pending under a live worker for ever. Reading it again counts as a delivery. An own pending entry
-- that was deleted (its job was cancelled) is acknowledged on the way.
--
-- Safe to run twice: the entry a lost first run delivered is pending under the consumer, and returned.
--
-- KEYS[1]  the first stream to read, then KEYS[2], ...: the streams in order of preference
-- ARGV[1]  consumer group
-- ARGV[2]  consumer
--
-- Returns false, or {stream, entry id, fields, deliveries by this stream's group}.

for i = 1, #KEYS do
  while true do
    local reply = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', 1, 'STREAMS', KEYS[i], '0')
    local entry = reply and reply[1] and reply[1][2][1]
    if not entry then break end
    if entry[2] then
      local pending = redis.call('XPENDING', KEYS[i], ARGV[1], entry[1], entry[1], 1)
      return {KEYS[i], entry[1], entry[2], pending[1][4]}
    end
    redis.call('XACK', KEYS[i], ARGV[1], entry[1])
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
