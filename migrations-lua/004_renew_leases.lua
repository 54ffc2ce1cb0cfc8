-- 004_renew_leases: extend the leases of the sessions a replica holds for one agent.
--
-- A lease that is no longer in the set was removed by DELETE (terminated) or claimed by a
-- sweeper after it lapsed; the holder must then end that session, so such ids are returned.
--
-- KEYS[1]  the agent's live-session set ({prefix}:agent:{<agent.org>}:live)
-- ARGV[1]  new lease expiry, Unix ms
-- ARGV[2…] session ids held by the caller
-- Returns  the ids among ARGV[2…] that are no longer in the set.
local gone = {}
for i = 2, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], 'XX', ARGV[1], ARGV[i])
  else
    gone[#gone + 1] = ARGV[i]
  end
end
return gone
