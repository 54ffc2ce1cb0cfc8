-- 002_update_session: move a session record from one status to the next, atomically.
--
-- Session records are hashes. Every transition (created pending, active, ended) is conditional on
-- the status the record is in, so that concurrent writers cannot undo each other: a session that
-- DELETE ended as `terminated` is not reopened, and its first end reason is the one kept.
--
-- A transition carries an id, stored with it: a caller that retries after losing the answer to
-- its first attempt is told "applied" rather than refused by its own earlier write.
--
-- KEYS[1]  the session record ({prefix}:{<session id>}:session)
-- ARGV[1]  comma-separated statuses the record may be in; an empty item stands for "no record"
-- ARGV[2]  time to live to set, in milliseconds; 0 keeps the current one
-- ARGV[3]  the transition's id
-- ARGV[4…] field, value, field, value, … to set
-- Returns  1 when applied (now or by the same transition before), 0 when the record was in
--          another status (nothing is written).
if redis.call('HGET', KEYS[1], 'txn') == ARGV[3] then
  return 1
end
local current = redis.call('HGET', KEYS[1], 'status') or ''
local allowed = false
for status in string.gmatch(ARGV[1] .. ',', '([^,]*),') do
  if status == current then
    allowed = true
    break
  end
end
if not allowed then
  return 0
end
redis.call('HSET', KEYS[1], 'txn', ARGV[3], unpack(ARGV, 4))
if tonumber(ARGV[2]) > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 1
