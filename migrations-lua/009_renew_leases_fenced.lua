-- 009_renew_leases_fenced: extend the leases of the sessions a replica holds for one agent, and
-- keep them when the store lost its data.
--
-- Replaces 004 on the request path. A lease missing from the set was removed by DELETE
-- (terminated) or claimed by a sweeper after it lapsed, and its holder must end the session;
-- but after Redis lost its data (a restart without persistence, a failover, a flush) every lease
-- is missing, and ending every live call for it would turn a store outage into dropped calls.
-- The agent's fence tells (see 007): when it is missing or was made by another server, the data
-- is gone, so the fence is made anew (refusing tokens minted before, as 008 would) and the
-- leases are put back, so that the cap counts these sessions again.
--
-- KEYS[1]  the agent's live-session set ({prefix}:agent:{<agent.org>}:live)
-- KEYS[2]  the agent's fence ({prefix}:agent:{<agent.org>}:fence)
-- ARGV[1]  new lease expiry, Unix ms
-- ARGV[2…] session ids held by the caller
-- Returns  the ids among ARGV[2…] that are no longer in the set (none after a loss of data).
local run = string.sub(string.match(redis.call('INFO', 'server'), 'run_id:(%x+)'), 1, 16)
local current = redis.call('GET', KEYS[2])
if not current or string.sub(current, 1, 16) ~= run then
  local now = redis.call('TIME')
  redis.call('SET', KEYS[2], run .. now[1] .. string.format('%06d', now[2]))
  for i = 2, #ARGV do
    redis.call('ZADD', KEYS[1], ARGV[1], ARGV[i])
  end
  return {}
end
local gone = {}
for i = 2, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], 'XX', ARGV[1], ARGV[i])
  else
    gone[#gone + 1] = ARGV[i]
  end
end
return gone
