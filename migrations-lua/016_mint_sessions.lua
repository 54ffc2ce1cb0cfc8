-- 016_mint_sessions: what 007 does for one /start, for several /start calls of one agent in one
-- request: those a replica's thread handles at the same moment (src/store/batch.rs,
-- `same_turn`), as connects (015). None waits for another's answer; a busy agent costs Redis one
-- script, one fence check, one count of its slots and one listing (ZADD) per batch instead of
-- per call (BENCHMARKS.md).
--
-- Each mint is 007's, in the order given: its rate limits counted (and the call refused, with
-- nothing else written, over any of them), the agent's cap checked, and for a token agent the
-- fence made sure of and the pending record written and listed. Minting takes no slot, so the
-- slots are counted once for the whole request.
--
-- KEYS[1]  the agent's fence ({prefix}:agent:{<agent.org>}:fence)
-- KEYS[2]  the agent's live-session set ({prefix}:agent:{<agent.org>}:live)
-- KEYS[3]  the agent's session list ({prefix}:agent:{<agent.org>}:sessions)
-- KEYS[4…] for each mint, in turn: the new session's record
--          ({prefix}:agent:{<agent.org>}:session:<sid>), then its rate counters of the current
--          window ({prefix}:rate:{<bucket>}:<window>), only where one request may reach them
--          (never on a Cluster, whose caller counts them apart)
-- ARGV[1]  the agent's cap; 0 means none
-- ARGV[2]  rate window, ms (counters expire two windows later)
-- ARGV[3]  how long the session list is kept, ms
-- ARGV[4…] for each mint, in turn: now (Unix ms); the record's time to live (ms; 0 writes no
--          record, for agents without tokens); the session id; the number r of its rate
--          counters; one limit per counter; the number n of the record's field and value items;
--          and those n items
-- Returns  for each mint, in order: {'ok', fence} (fence false when no record was written),
--          {'rate_limited'} or {'at_capacity'}; nothing of a mint is written but its rate counts
--          unless 'ok'.
local cap, window = tonumber(ARGV[1]), 2 * tonumber(ARGV[2])
local fenced_as, live, listed = nil, nil, {}

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

local function mint(key, at)
  local now, ttl, sid, rates = ARGV[at], tonumber(ARGV[at + 1]), ARGV[at + 2], tonumber(ARGV[at + 3])
  local limited = false
  for i = 1, rates do
    local count = redis.call('INCR', KEYS[key + i])
    redis.call('PEXPIRE', KEYS[key + i], window)
    if count > tonumber(ARGV[at + 3 + i]) then
      limited = true
    end
  end
  if limited then
    return {'rate_limited'}
  end
  if cap > 0 then
    live = live or redis.call('ZCOUNT', KEYS[2], '(' .. now, '+inf')
    if live >= cap then
      return {'at_capacity'}
    end
  end
  if ttl == 0 then
    return {'ok', false}
  end
  local current = fence()
  local first = at + 5 + rates
  redis.call('HSET', KEYS[key], unpack(ARGV, first, first + tonumber(ARGV[first - 1]) - 1))
  redis.call('PEXPIRE', KEYS[key], ttl)
  listed[#listed + 1] = now
  listed[#listed + 1] = sid
  return {'ok', current}
end

local answers, at, key = {}, 4, 4
while at <= #ARGV do
  answers[#answers + 1] = mint(key, at)
  local rates = tonumber(ARGV[at + 3])
  key = key + 1 + rates
  at = at + 5 + rates + tonumber(ARGV[at + 4 + rates])
end
if #listed > 0 then
  redis.call('ZADD', KEYS[3], unpack(listed))
  redis.call('PEXPIRE', KEYS[3], ARGV[3])
end
return answers
