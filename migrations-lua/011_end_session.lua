-- 011_end_session: the end of a session, in one request: its record moved to ended (as 002 moves
-- it, from pending or active only, so that a session DELETE ended keeps its first end reason),
-- its slot let go, and the `ended` event.
--
-- The transition carries an id, as in 002: a retry after a lost answer is told "applied". The
-- slot and the event do not depend on the record: a session ended through the API still lets go
-- of its slot here, and its end is still logged.
--
-- KEYS[1]  the session's record ({prefix}:agent:{<agent.org>}:session:<sid>)
-- KEYS[2]  the agent's live-session set ({prefix}:agent:{<agent.org>}:live)
-- KEYS[3]  the agent's event log ({prefix}:agent:{<agent.org>}:events)
-- ARGV[1]  the session id
-- ARGV[2]  the transition's id
-- ARGV[3]  the ended record's time to live, ms
-- ARGV[4]  the event, as JSON
-- ARGV[5]  how many events the log keeps
-- ARGV[6]  how long the log is kept after its newest event, ms
-- ARGV[7…] field, value, field, value, … of the ended record
-- Returns  1 when the record was moved to ended (now or by the same transition before), 0 when
--          it was not pending or active (ended already, or gone).
local applied = 0
local record = redis.call('HMGET', KEYS[1], 'txn', 'status')
if record[1] == ARGV[2] then
  applied = 1
else
  local status = record[2]
  if status == 'pending' or status == 'active' then
    redis.call('HSET', KEYS[1], 'txn', ARGV[2], unpack(ARGV, 7))
    redis.call('PEXPIRE', KEYS[1], ARGV[3])
    applied = 1
  end
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('LPUSH', KEYS[3], ARGV[4])
redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[5]) - 1)
redis.call('PEXPIRE', KEYS[3], ARGV[6])
return applied
