-- 007_mint_session: everything /start asks of the store, in one request: the rate limits, the
-- agent's cap, the store's fence, the pending record of the new session and its listing.
--
-- The fence tells tokens minted before a loss of the store's data from those minted after. Its
-- value begins with the run id of the Redis server that wrote it (16 hex digits), which changes
-- when the server restarts (with or without its data) and differs on a replica promoted by a
-- failover; then the time it was made. A fence that is missing (the data is gone, or flushed),
-- or that another server wrote (a restart, a failover, a slot moved to another node) is made anew,
-- and every token carries the fence it was minted under: 008 refuses those of an older one. The
-- fence is one key per agent so that it shares the agent's hash tag, and so its Cluster node.
--
-- KEYS[1]  the agent's fence ({prefix}:agent:{<agent.org>}:fence)
-- KEYS[2]  the agent's live-session set ({prefix}:agent:{<agent.org>}:live)
-- KEYS[3]  the new session's record ({prefix}:agent:{<agent.org>}:session:<sid>)
-- KEYS[4]  the agent's session list ({prefix}:agent:{<agent.org>}:sessions)
-- KEYS[5…] rate counters of the current window ({prefix}:rate:{<bucket>}:<window>), only where
--          one request may reach them (never on a Cluster, whose caller counts them apart)
-- ARGV[1]  now, Unix ms
-- ARGV[2]  the agent's cap; 0 means none
-- ARGV[3]  rate window, ms (counters expire two windows later)
-- ARGV[4]  the record's time to live, ms; 0 writes no record (agents without tokens)
-- ARGV[5]  how long the session list is kept, ms
-- ARGV[6]  the session id
-- ARGV[7…] one limit per rate counter, then field, value, field, value, … of the record
-- Returns  {'ok', fence} (fence false when no record was written), {'rate_limited'} or
--          {'at_capacity'}; nothing is written but the rate counts unless 'ok'.
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

local rates = #KEYS - 4
local limited = false
for i = 1, rates do
  local count = redis.call('INCR', KEYS[4 + i])
  redis.call('PEXPIRE', KEYS[4 + i], 2 * tonumber(ARGV[3]))
  if count > tonumber(ARGV[6 + i]) then
    limited = true
  end
end
if limited then
  return {'rate_limited'}
end
local cap = tonumber(ARGV[2])
if cap > 0 and redis.call('ZCOUNT', KEYS[2], '(' .. ARGV[1], '+inf') >= cap then
  return {'at_capacity'}
end
if tonumber(ARGV[4]) == 0 then
  return {'ok', false}
end
local current = fence()
redis.call('HSET', KEYS[3], unpack(ARGV, 7 + rates))
redis.call('PEXPIRE', KEYS[3], ARGV[4])
redis.call('ZADD', KEYS[4], ARGV[1], ARGV[6])
redis.call('PEXPIRE', KEYS[4], ARGV[5])
return {'ok', current}
