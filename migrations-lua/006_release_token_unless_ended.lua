-- 006_release_token_unless_ended: undo a token consume, only the caller's own, and never for a
-- session that has ended.
--
-- Replaces 001 on the request path. A connect that consumed its token gives it back when the bot
-- is unreachable, so the client can retry. But a DELETE may have ended the pending session in
-- between: it marks the record ended and spends the token, and when the connect already holds the
-- token, DELETE's own mark is refused. Giving the token back then would undo the termination. The
-- record and the mark share the session's hash tag, so one script sees both.
--
-- KEYS[1]  the consume key of the session ({prefix}:{<session id>}:token)
-- KEYS[2]  the session record ({prefix}:{<session id>}:session)
-- ARGV[1]  the holder value written by the caller's consume
-- Returns  1 when the key held ARGV[1] and was deleted, 0 otherwise (another holder, or the
--          session ended: the token stays spent).
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
if redis.call('HGET', KEYS[2], 'status') == 'ended' then
  return 0
end
return redis.call('DEL', KEYS[1])
