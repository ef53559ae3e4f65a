-- Releases an agent from the quarantine an operator saw, and only that one: if another
-- replica replaced it meanwhile (a new anomaly), the new one stays.
--
-- KEYS: 1 quarantine. ARGV: 1 the quarantine as read (JSON).
-- Returns 1 if released, 0 if the quarantine in force is another one (or none).
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
