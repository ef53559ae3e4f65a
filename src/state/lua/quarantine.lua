-- Quarantines an agent unless one is in force. A quarantine with an end expires then.
--
-- KEYS: 1 quarantine.
-- ARGV: 1 the quarantine (JSON), 2 its end (Unix ms; 0: until released).
-- Returns 1 if quarantined now, 0 if one already was.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
local until_ms = tonumber(ARGV[2])
if until_ms > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PXAT', until_ms)
else
  redis.call('SET', KEYS[1], ARGV[1])
end
return 1
