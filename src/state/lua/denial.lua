-- Counts one denial of a kind for an agent. If that makes `threshold` or more within the
-- window, returns how many and starts the count again (one caller among concurrent ones sees
-- the crossing); else 0.
--
-- KEYS: 1 the agent's denials of this kind (sorted set, scored by time).
-- ARGV: 1 window (ms), 2 threshold, 3 a unique member.
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms - window - 1)
redis.call('ZADD', KEYS[1], now_ms, ARGV[3])
local n = redis.call('ZCARD', KEYS[1])
if n >= math.max(1, tonumber(ARGV[2])) then
  redis.call('DEL', KEYS[1])
  return n
end
redis.call('PEXPIRE', KEYS[1], window + 1000)
return 0
