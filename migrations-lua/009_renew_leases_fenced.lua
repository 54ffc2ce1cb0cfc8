-- 009_renew_leases_fenced: extend the leases of the sessions a replica holds for one agent, and
-- keep them when the store lost its data.
--
-- Replaces 004 on the request path. A lease missing from the set was removed by DELETE
-- (terminated) or claimed by a sweeper after it lapsed, and its holder must end the session;
-- but after Redis lost its data (a restart without persistence, a failover, a flush) every lease
-- is missing, and ending every live call for it would turn a store outage into dropped calls.
-- The agent's fence tells (see 007): it is made anew when missing or made by another server, and
-- each replica passes the fence it saw at its previous renewal. When the fence had to be made
-- now, or differs from the one the caller saw, the data was lost since: the caller's leases are
-- put back (the cap counts these sessions again) and none is reported gone. So too on a
-- caller's first renewal of the agent, which has no fence to compare: another replica may have
-- made it anew since the loss. (A session ended by DELETE meanwhile is still stopped by the
-- termination announcement, and a sweeper claims only leases older than the first renewal.)
--
-- KEYS[1]  the agent's live-session set ({prefix}:agent:{<agent.org>}:live)
-- KEYS[2]  the agent's fence ({prefix}:agent:{<agent.org>}:fence)
-- ARGV[1]  new lease expiry, Unix ms
-- ARGV[2]  the fence the caller saw at its previous renewal of this agent; '' if none
-- ARGV[3…] session ids held by the caller
-- Returns  the current fence, then the ids among ARGV[3…] that are no longer in the set (none
--          after a loss of data).
local run = string.sub(string.match(redis.call('INFO', 'server'), 'run_id:(%x+)'), 1, 16)
local current = redis.call('GET', KEYS[2])
local made = false
if not current or string.sub(current, 1, 16) ~= run then
  local now = redis.call('TIME')
  current = run .. now[1] .. string.format('%06d', now[2])
  redis.call('SET', KEYS[2], current)
  made = true
end
if made or ARGV[2] ~= current then
  for i = 3, #ARGV do
    redis.call('ZADD', KEYS[1], ARGV[1], ARGV[i])
  end
  return {current}
end
local answer = {current}
for i = 3, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], 'XX', ARGV[1], ARGV[i])
  else
    answer[#answer + 1] = ARGV[i]
  end
end
return answer
