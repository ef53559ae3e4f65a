-- Writes an approval if it is still what the writer read (compare-and-set), with the index of
-- pending requests: what makes a decision, or a use, happen once across replicas.
--
-- KEYS: 1 the approval (`PREFIX:approval:{ID}`), 2 the agent's pending requests (hash: call
--       key -> id), 3 every approval (sorted set by request time, for listing).
-- ARGV: 1 the approval as read ("" if it must not exist yet), 2 the approval as written,
--       3 when to forget it (Unix ms), 4 its call key, 5 "set" (a new pending request: the call
--       key must still point at ARGV[7], "" for none) or "del" (no longer pending: drop the
--       call key if it points here), 6 its id, 7 see 5, 8 its request time (Unix s).
-- Returns 1 if written, 0 if the approval or the call key changed since it was read.
local current = redis.call('GET', KEYS[1])
if ARGV[1] == '' then
  if current then
    return 0
  end
elseif current ~= ARGV[1] then
  return 0
end
if ARGV[5] == 'set' then
  local pointing = redis.call('HGET', KEYS[2], ARGV[4]) or ''
  if pointing ~= ARGV[7] then
    return 0
  end
  redis.call('HSET', KEYS[2], ARGV[4], ARGV[6])
elseif ARGV[5] == 'del' then
  if redis.call('HGET', KEYS[2], ARGV[4]) == ARGV[6] then
    redis.call('HDEL', KEYS[2], ARGV[4])
  end
end
redis.call('SET', KEYS[1], ARGV[2], 'PXAT', ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[8], ARGV[6])
return 1
