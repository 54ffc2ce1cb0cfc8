-- 003_acquire_slot: take one of an agent's concurrent-session slots, if one is free.
--
-- An agent's live sessions are a sorted set of session ids scored by lease expiry (Unix ms).
-- Replicas renew the leases of the sessions they hold; a lease that is not renewed lapses, so a
-- replica that dies stops counting against the cap within one lease time, even before a sweeper
-- claims its sessions.
--
-- KEYS[1]  the agent's live-session set ({prefix}:agent:{<agent.org>}:live)
-- ARGV[1]  now, Unix ms
-- ARGV[2]  lease expiry for the new member, Unix ms
-- ARGV[3]  session id
-- ARGV[4]  the cap; 0 means none
-- Returns  1 when the slot was taken, 0 when the agent is at its cap.
local cap = tonumber(ARGV[4])
if cap > 0 and redis.call('ZCOUNT', KEYS[1], '(' .. ARGV[1], '+inf') >= cap then
  return 0
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
return 1
