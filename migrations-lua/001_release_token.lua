-- 001_release_token: undo a token consume, but only the caller's own.
--
-- A connect consumes its token with SET key holder NX PX ttl. When the bot then turns out to be
-- unreachable, the broker gives the token back so the client can retry within its lifetime. The
-- delete must be conditional: between the consume and the release the key may have expired and
-- been consumed again by another connect, whose mark must survive.
--
-- KEYS[1]  the consume key of the session ({prefix}:{<session id>}:token)
-- ARGV[1]  the holder value written by the caller's consume
-- Returns  1 when the key held ARGV[1] and was deleted, 0 otherwise.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
