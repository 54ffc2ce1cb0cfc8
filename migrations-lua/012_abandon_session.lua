-- 012_abandon_session: undoes 010 for a connect whose bot could not be reached, in one request:
-- the slot let go; for a token session, the record back to pending with the failure noted and
-- the token given back, so the client may connect again within the token's lifetime; for a
-- session without a token, the record ended with the failure as its reason. Then the event.
--
-- The record changes only while it is active: a session that DELETE ended meanwhile stays ended,
-- and its token stays spent (see 006).
--
-- KEYS[1]  the consume mark ({prefix}:agent:{<agent.org>}:token:<sid>)
-- KEYS[2]  the session's record ({prefix}:agent:{<agent.org>}:session:<sid>)
-- KEYS[3]  the agent's live-session set ({prefix}:agent:{<agent.org>}:live)
-- KEYS[4]  the agent's event log ({prefix}:agent:{<agent.org>}:events)
-- ARGV[1]  the holder value written by the connect's consume; '' for a session without a token
-- ARGV[2]  the session id
-- ARGV[3]  why the connect failed (an end reason); '' when the store answered too late: a token
--          session then notes nothing, one without a token ends with no reason
-- ARGV[4]  now, Unix ms
-- ARGV[5]  the record's time to live from now, ms: the token's remaining lifetime for a token
--          session, the retention of ended records for one without
-- ARGV[6]  the event, as JSON; '' for none
-- ARGV[7]  how many events the log keeps
-- ARGV[8]  how long the log is kept after its newest event, ms
-- Returns  1 when the token was given back, 0 otherwise.
local given_back = 0
redis.call('ZREM', KEYS[3], ARGV[2])
if redis.call('HGET', KEYS[2], 'status') == 'active' then
  if ARGV[1] ~= '' then
    redis.call('HSET', KEYS[2], 'status', 'pending')
    if ARGV[3] ~= '' then
      redis.call('HSET', KEYS[2], 'last_error', ARGV[3])
    end
    redis.call('HDEL', KEYS[2], 'replica', 'region', 'connected_ms')
  elseif ARGV[3] ~= '' then
    redis.call('HSET', KEYS[2], 'status', 'ended', 'end_reason', ARGV[3], 'ended_ms', ARGV[4],
      'detail', 'the bot could not be reached')
  else
    -- A connect refused because the store answered too late, whose request ran after all.
    redis.call('HSET', KEYS[2], 'status', 'ended', 'ended_ms', ARGV[4],
      'detail', 'the connect was refused: the store answered too late')
  end
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
end
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) == ARGV[1]
    and redis.call('HGET', KEYS[2], 'status') ~= 'ended' then
  given_back = redis.call('DEL', KEYS[1])
end
if ARGV[6] ~= '' then
  redis.call('LPUSH', KEYS[4], ARGV[6])
  redis.call('LTRIM', KEYS[4], 0, tonumber(ARGV[7]) - 1)
  redis.call('PEXPIRE', KEYS[4], ARGV[8])
end
return given_back
