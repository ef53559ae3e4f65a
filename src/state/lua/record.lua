-- Records one call in an agent's history: a sorted set scored by the call's time. What is
-- older than the retention goes, and the oldest beyond the cap.
--
-- KEYS: 1 the agent's history.
-- ARGV: 1 the call's time (Unix ms), 2 the call (JSON, unique), 3 retention (ms), 4 cap.
local at = tonumber(ARGV[1])
local retention = tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], at, ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', at - retention - 1)
local cap = tonumber(ARGV[4])
local n = redis.call('ZCARD', KEYS[1])
if n > cap then
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, n - cap - 1)
end
redis.call('PEXPIRE', KEYS[1], retention + 60000)
return n
