-- Drop a departed worker's stream once it holds no entry, checked in the same step as the deletion, so
-- that a job submitted to it after the last move is never deleted with it.
--
-- Safe to run twice: nothing is left to drop.
--
-- KEYS[1]  the stream
-- KEYS[2]  set of every job stream
--
-- Returns 1 if the stream was dropped, 0 if it holds entries again.

if redis.call('XLEN', KEYS[1]) > 0 then return 0 end
redis.call('SREM', KEYS[2], KEYS[1])
redis.call('DEL', KEYS[1])
return 1
