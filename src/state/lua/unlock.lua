-- Ends an agent's history turn, if it is still the holder's (its token): a turn that outlived
-- its expiry and was taken by another replica is not ended by the first.
--
-- KEYS: 1 the turn. ARGV: 1 the holder's token.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
