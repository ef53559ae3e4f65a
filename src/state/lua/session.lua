-- MCP sessions of the handshake revisions, for every replica: open, check or end one.
--
-- KEYS: 1 the session (`PREFIX:mcp_session:{ID}`: "AGENT|VERSION", expiring when idle),
--       2 the agent's open sessions (sorted set of ids, scored by when each goes idle).
-- ARGV: 1 op ("open", "check", "end"), 2 agent, 3 id, 4 idle (ms), 5 version (open),
--       6 the most sessions an agent may hold (open).
-- Returns: open: 1, or 0 if the agent holds its most; check: the version, "" if unknown,
-- "!" if another agent's; end: 1, "" if unknown, "!" if another agent's.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local op, agent, id, idle = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if op == 'open' then
  if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[6]) then
    return 0
  end
  redis.call('SET', KEYS[1], agent .. '|' .. ARGV[5], 'PX', idle)
  redis.call('ZADD', KEYS[2], now + idle, id)
  redis.call('PEXPIRE', KEYS[2], idle)
  return 1
end
local v = redis.call('GET', KEYS[1])
if not v then
  return ''
end
local owner, version = string.match(v, '^(.*)|([^|]*)$')
if owner ~= agent then
  return '!'
end
if op == 'end' then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], id)
  return 1
end
redis.call('PEXPIRE', KEYS[1], idle)
redis.call('ZADD', KEYS[2], now + idle, id)
redis.call('PEXPIRE', KEYS[2], idle)
return version
