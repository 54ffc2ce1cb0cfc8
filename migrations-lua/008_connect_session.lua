-- 008_connect_session: everything a WebSocket connect asks of the store before the bot is
-- dialled, in one request: the fence, the token's one-time consume, a slot under the agent's cap,
-- and the body minted with the token.
--
-- The token must carry the agent's current fence (see 007): a token minted before the store lost
-- data, or before a failover or restart, is refused, since the mark of its consume may be among
-- what was lost. Its pending record must still exist for the same reason. Then the consume itself,
-- `SET mark holder NX PX ms`, keyed by session id; then the slot. At the cap the consume is undone
-- here, so a refused connect leaves the token usable without a second request. A retry that finds
-- its own holder in the mark (its first answer was lost) goes on as if it had won.
--
-- KEYS[1]  the agent's fence ({prefix}:agent:{<agent.org>}:fence)
-- KEYS[2]  the consume mark ({prefix}:agent:{<agent.org>}:token:<sid>)
-- KEYS[3]  the session's record ({prefix}:agent:{<agent.org>}:session:<sid>)
-- KEYS[4]  the agent's live-session set ({prefix}:agent:{<agent.org>}:live)
-- ARGV[1]  the fence the token was minted under
-- ARGV[2]  the holder value to write in the mark
-- ARGV[3]  the mark's time to live, ms (the token's remaining lifetime and the skew margin)
-- ARGV[4]  now, Unix ms
-- ARGV[5]  the new lease's expiry, Unix ms
-- ARGV[6]  the session id
-- ARGV[7]  the agent's cap; 0 means none
-- ARGV[8]  '1' to return the body minted with the token
-- Returns  {'ok', body or false}, or one of {'fenced'}, {'replayed'}, {'terminated'},
--          {'at_capacity'}; nothing stays written unless 'ok' (but a fence made anew).
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

if fence() ~= ARGV[1] then
  return {'fenced'}
end
local status = redis.call('HGET', KEYS[3], 'status')
if not status then
  return {'fenced'}
end
local held = redis.call('GET', KEYS[2])
if held == 'terminated' or (not held and status == 'ended') then
  return {'terminated'}
elseif held and held ~= ARGV[2] then
  return {'replayed'}
elseif not held then
  redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[3])
end
-- From here the mark is this caller's.
local cap = tonumber(ARGV[7])
if cap > 0 and not redis.call('ZSCORE', KEYS[4], ARGV[6])
    and redis.call('ZCOUNT', KEYS[4], '(' .. ARGV[4], '+inf') >= cap then
  redis.call('DEL', KEYS[2])
  return {'at_capacity'}
end
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[6])
if ARGV[8] == '1' then
  return {'ok', redis.call('HGET', KEYS[3], 'body') or false}
end
return {'ok', false}
