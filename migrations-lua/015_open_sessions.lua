-- 015_open_sessions: what 014 does for one connect, for several connects to one agent in one
-- request: those a replica's thread handles at the same moment (src/store/batch.rs,
-- `same_turn`). None waits for another's answer, so a connect still costs one round trip; a busy
-- agent costs Redis one script, one fence check, one count of its slots and one listing (ZADD)
-- per batch instead of per connect (BENCHMARKS.md).
--
-- Each open is 014's, in the order given: for a token session the fence, the token's one-time
-- consume and the body minted with it; for every session a slot under the agent's cap, and the
-- record marked active (created and listed for a session without a token). An open refused
-- leaves nothing written of itself, and changes nothing of the others. A retry that finds its own
-- holder in the mark, or its own slot, goes on as if it had won (its first answer was lost).
--
-- KEYS[1]  the agent's fence ({prefix}:agent:{<agent.org>}:fence)
-- KEYS[2]  the agent's live-session set ({prefix}:agent:{<agent.org>}:live)
-- KEYS[3]  the agent's session list ({prefix}:agent:{<agent.org>}:sessions)
-- KEYS[4…] for each open, in turn: the session's record
--          ({prefix}:agent:{<agent.org>}:session:<sid>) and its consume mark
--          ({prefix}:agent:{<agent.org>}:token:<sid>)
-- ARGV[1]  the agent's cap; 0 means none
-- ARGV[2]  how long the session list keeps a session, ms
-- ARGV[3…] for each open, in turn: '1' for a token session or '0'; the fence the token was minted
--          under; the holder value to write in the mark; the mark's time to live (ms); '1' to
--          return the body minted with the token; now (Unix ms; a session without a token is
--          listed as created now); the new lease's expiry (Unix ms); the session id; the active
--          record's time to live (ms); the number n of the record's field and value items; and
--          those n items
-- Returns  for each open, in order: {'ok', body or false}, or one of {'fenced'}, {'replayed'},
--          {'terminated'}, {'at_capacity'}.
local cap = tonumber(ARGV[1])
local fenced_as, count, listed = nil, nil, {}

local function fence()
  if fenced_as then
    return fenced_as
  end
  local run = string.sub(string.match(redis.call('INFO', 'server'), 'run_id:(%x+)'), 1, 16)
  local current = redis.call('GET', KEYS[1])
  if not (current and string.sub(current, 1, 16) == run) then
    local now = redis.call('TIME')
    current = run .. now[1] .. string.format('%06d', now[2])
    redis.call('SET', KEYS[1], current)
  end
  fenced_as = current
  return current
end

local function open(record, mark, at)
  local token, minted_under, holder = ARGV[at] == '1', ARGV[at + 1], ARGV[at + 2]
  local mark_ttl, want_body, now, expiry = ARGV[at + 3], ARGV[at + 4], ARGV[at + 5], ARGV[at + 6]
  local sid, record_ttl, n = ARGV[at + 7], ARGV[at + 8], tonumber(ARGV[at + 9])
  if token then
    if fence() ~= minted_under then
      return {'fenced'}
    end
    local status = redis.call('HGET', record, 'status')
    if not status then
      return {'fenced'}
    end
    local held = redis.call('GET', mark)
    if held == 'terminated' or (not held and status == 'ended') then
      return {'terminated'}
    elseif held and held ~= holder then
      return {'replayed'}
    elseif status == 'ended' then
      -- Ended through the API after this caller's first attempt consumed the token: the token
      -- stays spent.
      return {'terminated'}
    elseif not held then
      redis.call('SET', mark, holder, 'NX', 'PX', mark_ttl)
    end
  end
  -- From here the mark, if any, is this caller's. The slots are counted once per request, and
  -- the count kept as the opens before this one add theirs.
  if cap > 0 then
    count = count or redis.call('ZCOUNT', KEYS[2], '(' .. now, '+inf')
    if count >= cap and not redis.call('ZSCORE', KEYS[2], sid) then
      if token then
        redis.call('DEL', mark)
      end
      return {'at_capacity'}
    end
  end
  local added = redis.call('ZADD', KEYS[2], expiry, sid)
  if count then
    count = count + added
  end
  redis.call('HSET', record, unpack(ARGV, at + 10, at + 9 + n))
  redis.call('PEXPIRE', record, record_ttl)
  if not token then
    listed[#listed + 1] = now
    listed[#listed + 1] = sid
  end
  if want_body == '1' then
    return {'ok', redis.call('HGET', record, 'body') or false}
  end
  return {'ok', false}
end

local answers, at, key = {}, 3, 4
while at <= #ARGV do
  answers[#answers + 1] = open(KEYS[key], KEYS[key + 1], at)
  at = at + 10 + tonumber(ARGV[at + 9])
  key = key + 2
end
if #listed > 0 then
  redis.call('ZADD', KEYS[3], unpack(listed))
  redis.call('PEXPIRE', KEYS[3], ARGV[2])
end
return answers
