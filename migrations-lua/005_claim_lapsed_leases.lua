-- 005_claim_lapsed_leases: remove lapsed leases and hand each to exactly one sweeper.
--
-- A lease lapses when its replica stopped renewing it (it died without cleaning up). The sweeper
-- that removes a lease marks its session `replica_lost`; removal and read are one step so that
-- two sweepers never both claim the same session.
--
-- KEYS[1]  the agent's live-session set ({prefix}:agent:{<agent.org>}:live)
-- ARGV[1]  now, Unix ms
-- ARGV[2]  most ids to claim in one call
-- Returns  the claimed session ids.
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
if #lapsed > 0 then
  redis.call('ZREM', KEYS[1], unpack(lapsed))
end
return lapsed
