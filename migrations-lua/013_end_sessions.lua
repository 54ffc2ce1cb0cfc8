-- 013_end_sessions: the ends of several sessions of one agent, in one request, each as 011 ends
-- one: its record moved to ended (from pending or active only, so that a session DELETE ended
-- keeps its first end reason), its slot let go, and its `ended` event. The slots go in one ZREM
-- and the events in one LPUSH, and the log is trimmed and kept once: a replica sends the ends of
-- an agent's sessions that closed within a few milliseconds of each other together, which costs
-- Redis about a third of one 011 per session (BENCHMARKS.md).
--
-- Each transition carries an id, as in 011: a retry after a lost answer is told "applied".
--
-- KEYS[1]  the agent's live-session set ({prefix}:agent:{<agent.org>}:live)
-- KEYS[2]  the agent's event log ({prefix}:agent:{<agent.org>}:events)
-- KEYS[3…] the sessions' records ({prefix}:agent:{<agent.org>}:session:<sid>), in the order
--          of their ends below
-- ARGV[1]  the ended records' time to live, ms
-- ARGV[2]  how many events the log keeps
-- ARGV[3]  how long the log is kept after its newest event, ms
-- ARGV[4…] for each end, in turn: the session id, the transition's id, the event as JSON, the
--          number n of the record's field and value items, then those n items
-- Returns  for each end, in order: 1 when its record was moved to ended (now or by the same
--          transition before), 0 when it was not pending or active (ended already, or gone).
local applied, sids, events = {}, {}, {}
local at = 4
for i = 3, #KEYS do
  local sid, txn, event, n = ARGV[at], ARGV[at + 1], ARGV[at + 2], tonumber(ARGV[at + 3])
  local first, last = at + 4, at + 3 + n
  at = last + 1
  local done = 0
  local record = redis.call('HMGET', KEYS[i], 'txn', 'status')
  if record[1] == txn then
    done = 1
  elseif record[2] == 'pending' or record[2] == 'active' then
    redis.call('HSET', KEYS[i], 'txn', txn, unpack(ARGV, first, last))
    redis.call('PEXPIRE', KEYS[i], ARGV[1])
    done = 1
  end
  applied[#applied + 1] = done
  sids[#sids + 1] = sid
  events[#events + 1] = event
end
if #sids > 0 then
  redis.call('ZREM', KEYS[1], unpack(sids))
  redis.call('LPUSH', KEYS[2], unpack(events))
  redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[2]) - 1)
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
return applied
