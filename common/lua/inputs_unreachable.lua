-- A worker gives back a delivery whose job's input images it could not read because their store (the blob
-- store, or Redis) could not be reached: the job is not failed and its entry stays pending, to be delivered
-- again. The give-back is recorded in the job's record, so that it does not use up the job's poison budget
-- (`--max-deliveries`: deliveries of a job that kept killing its workers; the dead-letter decision subtracts
-- these), and counted, for the separate bound on them (`--max-input-retries`), with the store's error, which
-- names the cause when that bound dead-letters the job.
--
-- Each delivery is counted once, by its attempt token (`unreachable:<token>` in the record), whatever order
-- the calls come in.
--
-- Safe to run twice: a rerun for the same delivery counts nothing more and returns the same count.
--
-- KEYS[1]  job record hash
-- ARGV[1]  attempt token of this delivery (stream, entry id and delivery count)
-- ARGV[2]  the store's error
--
-- Returns how many deliveries of the job were given back so far, this one included; -1 when the job is
-- terminal or its record is gone (nothing is recorded: there is nothing left to deliver again).

local status = redis.call('HGET', KEYS[1], 'status')
if not status or status == 'succeeded' or status == 'failed' or status == 'cancelled' then return -1 end
if redis.call('HSETNX', KEYS[1], 'unreachable:' .. ARGV[1], '1') == 1 then
  redis.call('HINCRBY', KEYS[1], 'unreachable', 1)
  redis.call('HSET', KEYS[1], 'unreachable_error', ARGV[2])
end
return tonumber(redis.call('HGET', KEYS[1], 'unreachable'))
