-- A worker gives back a job that Redis lost (restored from an older state, failed over to a replica that
-- missed it) while the worker held a delivery of it from before: its start script made the job's record
-- again from nothing (a record without the job), and its input images, stored in Redis, are gone. The
-- record it made is removed, so that Redis does not know the job, and the gateway that accepted it queues it
-- again with its input images (gateway/journal.py) rather than the worker failing it.
--
-- Safe to run twice: the record is gone, or holds the job again: nothing changes.
--
-- KEYS[1]  job record hash
-- KEYS[2]  attempts list
-- ARGV[1]  attempt token of this delivery
--
-- Returns 1 when the record was removed; 0 when it holds the job (Redis did not lose it: its inputs
-- expired) or another delivery's start, or is gone.

if redis.call('HEXISTS', KEYS[1], 'job') == 1 then return 0 end
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
return 1
