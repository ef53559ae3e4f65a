-- Settles or gives back a budget lease, atomically.
--
-- KEYS: 1 budget (hash), 2 leases (sorted set).
-- ARGV: 1 the lease ("id|tokens"), 2 its tokens, 3 input tokens used, 4 output tokens used
--       (3 and 4 both 0: given back unused).
-- The lease's tokens leave `reserved` only if the lease was still there (an expired lease was
-- already given back by the admission that found it). What flowed is charged to the window
-- the answer came in.
local t = redis.call('TIME')
local window = math.floor(tonumber(t[1]) / 3600)
local b = redis.call('HMGET', KEYS[1], 'window', 'used', 'reserved', 'expected')
local used = tonumber(b[2]) or 0
local reserved = tonumber(b[3]) or 0
local expected = tonumber(b[4]) or 0
if tonumber(b[1]) ~= window then
  used = 0
end
if redis.call('ZREM', KEYS[2], ARGV[1]) == 1 then
  reserved = math.max(0, reserved - tonumber(ARGV[2]))
end
local input = tonumber(ARGV[3])
local output = tonumber(ARGV[4])
used = used + input + output
if output > 0 then
  expected = math.ceil((expected * 3 + output) / 4)
end
redis.call('HSET', KEYS[1], 'window', window, 'used', used, 'reserved', reserved, 'expected', expected)
redis.call('PEXPIRE', KEYS[1], 7200000)
return used
