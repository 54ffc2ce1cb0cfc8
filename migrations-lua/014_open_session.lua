-- 014_open_session: what 010 does, but for the `connected` event, which the broker now logs
-- once the bot has answered, sent with other writes off the connect's path (013): each event
-- cost three calls and three arguments here, on the path of every connect. Everything a
-- WebSocket connect asks of the store, and the start of its session, in one request. For a
-- token session: the fence, the token's one-time consume and the body minted with it. For every
-- session: a slot under the agent's cap, and the record marked active (created for a session
-- without a token, which is listed here as well). The record is active from before the bot is
-- dialled, so that nothing is left for the store to do between the bot's answer and the
-- client's upgrade; a connect whose bot cannot be reached is undone by 012.
--
-- A retry that finds its own holder in the mark (its first answer was lost) goes on as if it had
-- won; a session without a token that finds its own slot does the same.
--
-- KEYS[1]  the agent's fence ({prefix}:agent:{<agent.org>}:fence)
-- KEYS[2]  the consume mark ({prefix}:agent:{<agent.org>}:token:<sid>)
-- KEYS[3]  the session's record ({prefix}:agent:{<agent.org>}:session:<sid>)
-- KEYS[4]  the agent's live-session set ({prefix}:agent:{<agent.org>}:live)
-- KEYS[5]  the agent's session list ({prefix}:agent:{<agent.org>}:sessions)
-- ARGV[1]  '1' for a token session, '0' for a session without a token
-- ARGV[2]  the fence the token was minted under (token sessions)
-- ARGV[3]  the holder value to write in the mark (token sessions)
-- ARGV[4]  the mark's time to live, ms (token sessions)
-- ARGV[5]  '1' to return the body minted with the token
-- ARGV[6]  now, Unix ms (a session without a token is listed as created now)
-- ARGV[7]  the new lease's expiry, Unix ms
-- ARGV[8]  the session id
-- ARGV[9]  the agent's cap; 0 means none
-- ARGV[10] the active record's time to live, ms
-- ARGV[11] how long the session list keeps a session, ms
-- ARGV[12…] field, value, field, value, … of the active record
-- Returns  {'ok', body or false}, or one of {'fenced'}, {'replayed'}, {'terminated'},
--          {'at_capacity'}; nothing stays written unless 'ok' (but a fence made anew).
local token = ARGV[1] == '1'
local function fence()
  local run = string.sub(string.match(redis.call('INFO', 'server'), 'run_id:(%x+)'), 1, 16)
  local current = redis.call('GET', KEYS[1])
  if current and string.sub(current, 1, 16) == run then
    return current
  end
  local now = redis.call('TIME')
  current = run .. now[1] .. string.format('%06d', now[2])
  redis.call('SET', KEYS[1], current)
  return current
end

if token then
  if fence() ~= ARGV[2] then
    return {'fenced'}
  end
  local status = redis.call('HGET', KEYS[3], 'status')
  if not status then
    return {'fenced'}
  end
  local held = redis.call('GET', KEYS[2])
  if held == 'terminated' or (not held and status == 'ended') then
    return {'terminated'}
  elseif held and held ~= ARGV[3] then
    return {'replayed'}
  elseif status == 'ended' then
    -- Ended through the API after this caller's first attempt consumed the token: the token
    -- stays spent.
    return {'terminated'}
  elseif not held then
    redis.call('SET', KEYS[2], ARGV[3], 'NX', 'PX', ARGV[4])
  end
end
-- From here the mark, if any, is this caller's.
local cap = tonumber(ARGV[9])
-- The count first: under the cap (the common case) no retry's own slot needs looking for.
if cap > 0 and redis.call('ZCOUNT', KEYS[4], '(' .. ARGV[6], '+inf') >= cap
    and not redis.call('ZSCORE', KEYS[4], ARGV[8]) then
  if token then
    redis.call('DEL', KEYS[2])
  end
  return {'at_capacity'}
end
redis.call('ZADD', KEYS[4], ARGV[7], ARGV[8])
redis.call('HSET', KEYS[3], unpack(ARGV, 12))
redis.call('PEXPIRE', KEYS[3], ARGV[10])
if not token then
  redis.call('ZADD', KEYS[5], ARGV[6], ARGV[8])
  redis.call('PEXPIRE', KEYS[5], ARGV[11])
end
if ARGV[5] == '1' then
  return {'ok', redis.call('HGET', KEYS[3], 'body') or false}
end
return {'ok', false}
