-- 013_write_sessions: the writes of one agent's sessions that are on no caller's path, several
-- in one request: ends, each as 011 ends one (its record moved to ended, from pending or active
-- only, so that a session DELETE ended keeps its first end reason; its slot let go; its `ended`
-- event), and events alone (`connected`, `terminated through the API`). The slots go in one
-- ZREM and the events in one LPUSH, and the log is trimmed and kept once: a replica sends an
-- agent's writes of the same few milliseconds together, which costs Redis a fraction of one
-- script per write (BENCHMARKS.md).
--
-- Each end's transition carries an id, the same on every try of that end (unlike 011's): a
-- retry after a lost answer, even one sent seconds later, is told "applied" and logs nothing.
--
-- KEYS[1]  the agent's live-session set ({prefix}:agent:{<agent.org>}:live)
-- KEYS[2]  the agent's event log ({prefix}:agent:{<agent.org>}:events)
-- KEYS[3…] the records of the ended sessions ({prefix}:agent:{<agent.org>}:session:<sid>), in
--          the order of the ends below
-- ARGV[1]  how many events the log keeps
-- ARGV[2]  how long the log is kept after its newest event, ms
-- ARGV[3…] for each write, in turn, its event as JSON and then either 'event' (nothing else),
--          or 'end', the session id, the transition's id (the same on every try of this end),
--          the ended record's time to live (ms), the number n of the record's field and value
--          items, and those n items
-- Returns  for each write, in order: 1 for an event alone, and for an end 1 when its record was
--          moved to ended (now or by the same transition before), 0 when it was not pending or
--          active (ended already, or gone).
local applied, ended, events = {}, {}, {}
local at, record = 3, 3
while at <= #ARGV do
  local event, done = ARGV[at], 1
  if ARGV[at + 1] == 'event' then
    at = at + 2
  else
    local sid, txn, ttl, n = ARGV[at + 2], ARGV[at + 3], ARGV[at + 4], tonumber(ARGV[at + 5])
    local first, last = at + 6, at + 5 + n
    at = last + 1
    local key = KEYS[record]
    record = record + 1
    local current = redis.call('HMGET', key, 'txn', 'status')
    if current[1] == txn then
      -- A repeat of an end already written: its event is in the log.
      event = nil
    elseif current[2] == 'pending' or current[2] == 'active' then
      redis.call('HSET', key, 'txn', txn, unpack(ARGV, first, last))
      redis.call('PEXPIRE', key, ttl)
    else
      done = 0
    end
    ended[#ended + 1] = sid
  end
  if event then
    events[#events + 1] = event
  end
  applied[#applied + 1] = done
end
if #ended > 0 then
  redis.call('ZREM', KEYS[1], unpack(ended))
end
if #events > 0 then
  redis.call('LPUSH', KEYS[2], unpack(events))
  redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[1]) - 1)
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
return applied
