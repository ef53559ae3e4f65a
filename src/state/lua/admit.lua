-- Admits one call, atomically: the agent's quarantine, its hourly token budget and its rate
-- allowances, checked together and taken together (nothing is taken unless all admit).
--
-- KEYS: 1 quarantine, 2 budget (hash), 3 leases (sorted set), 4 the tool's rate cell,
--       5 the agent's rate cell. All carry the agent's hash tag.
-- ARGV: 1 tokens_per_hour (0: no budget), 2 the call's input tokens, 3 the answer's tokens to
--       reserve (-1: the state's estimate), 4 lease id, 5 lease length (ms), 6 the tool's
--       calls per minute (0: none), 7 the agent's calls per minute (0: none).
-- Returns {0} admitted ({0, tokens reserved} with a budget); {1, quarantine} quarantined; {2, ms} over budget until the hour
-- resets; {3, ms} / {4, ms} the tool's / the agent's rate, and how long to wait.
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_ms = math.floor(now_us / 1000)
local now_s = tonumber(t[1])

local q = redis.call('GET', KEYS[1])
if q then
  return {1, q}
end

-- The budget first (as the memory backend: a call over both limits is told of the budget).
local limit = tonumber(ARGV[1])
local window, used, reserved, need
if limit > 0 then
  window = math.floor(now_s / 3600)
  local b = redis.call('HMGET', KEYS[2], 'window', 'used', 'reserved', 'expected')
  used = tonumber(b[2]) or 0
  reserved = tonumber(b[3]) or 0
  local expected = tonumber(b[4]) or 0
  if tonumber(b[1]) ~= window then
    used = 0
  end
  -- Leases of replicas that died mid-call give their tokens back.
  local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now_ms)
  for _, m in ipairs(expired) do
    reserved = reserved - (tonumber(string.match(m, '|(%d+)$')) or 0)
  end
  if reserved < 0 then
    reserved = 0
  end
  if #expired > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now_ms)
    redis.call('HSET', KEYS[2], 'reserved', reserved)
  end
  need = tonumber(ARGV[2])
  local answer = tonumber(ARGV[3])
  if answer >= 0 then
    need = need + answer
  elseif reserved > 0 then
    -- The expected answer counts while other calls are in flight; a call alone needs only
    -- its arguments to fit.
    need = need + expected
  end
  if used + reserved + need > limit then
    return {2, ((window + 1) * 3600 - now_s) * 1000}
  end
end

-- Rate cells (GCRA, as governor's: a burst of n, one call back every 60/n s). A cell holds
-- its theoretical arrival time in microseconds.
local MINUTE_US = 60000000
local function gcra(key, n)
  if n <= 0 then
    return nil, nil
  end
  local interval = MINUTE_US / n
  local tat = tonumber(redis.call('GET', key)) or now_us
  if tat < now_us then
    tat = now_us
  end
  local next_tat = tat + interval
  local allowed_at = next_tat - MINUTE_US
  if allowed_at > now_us then
    return nil, math.ceil((allowed_at - now_us) / 1000)
  end
  return next_tat, nil
end
local tool_tat, tool_wait = gcra(KEYS[4], tonumber(ARGV[6]))
if tool_wait then
  return {3, tool_wait}
end
local agent_tat, agent_wait = gcra(KEYS[5], tonumber(ARGV[7]))
if agent_wait then
  return {4, agent_wait}
end

-- Everything admits: take it all.
if limit > 0 then
  local lease_ms = tonumber(ARGV[5])
  redis.call('HSET', KEYS[2], 'window', window, 'used', used, 'reserved', reserved + need)
  redis.call('ZADD', KEYS[3], now_ms + lease_ms, ARGV[4] .. '|' .. need)
  local keep = math.max(7200000, lease_ms * 2)
  redis.call('PEXPIRE', KEYS[2], keep)
  redis.call('PEXPIRE', KEYS[3], keep)
end

if tool_tat then
  redis.call('SET', KEYS[4], string.format('%.0f', tool_tat), 'PX', math.ceil((tool_tat - now_us) / 1000) + 1)
end
if agent_tat then
  redis.call('SET', KEYS[5], string.format('%.0f', agent_tat), 'PX', math.ceil((agent_tat - now_us) / 1000) + 1)
end
if limit > 0 then
  return {0, need}
end
return {0}
