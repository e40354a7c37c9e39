-- stanchion-ratelimit: GCRA over several quotas, all or nothing, in one round trip.
-- The same arithmetic as src/gcra.rs (microseconds, absolute time).
-- KEYS[1]  the key's hash (field i = TAT of quota i)
-- ARGV[1]  now in microseconds, or 0 to use the server's TIME
-- ARGV[2]  cost
-- ARGV[3]  number of quotas n; then per quota: emission interval, capacity (burst * interval), burst
-- Returns {verdict (0 allowed, 1 denied, 2 impossible), quota index (0-based), remaining,
--          reset_after_us, retry_after_us, corrupt fields found}
local key = KEYS[1]
local now = tonumber(ARGV[1])
if now == 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local cost = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local fields = {}
for i = 1, n do fields[i] = tostring(i - 1) end
local stored = redis.call('HMGET', key, unpack(fields))
local tats, em, cap, burst = {}, {}, {}, {}
local corrupt = 0
for i = 1, n do
  em[i] = tonumber(ARGV[1 + 3 * i])
  cap[i] = tonumber(ARGV[2 + 3 * i])
  burst[i] = tonumber(ARGV[3 + 3 * i])
  local v = stored[i]
  local t = 0
  if v then
    t = tonumber(v)
    if t == nil or t < 0 or t ~= math.floor(t) then
      corrupt = corrupt + 1
      t = 0
    end
  end
  tats[i] = t
end
local function remaining(i, ahead)
  local r = cap[i] - ahead
  if r < 0 then return 0 end
  return math.floor(r / em[i])
end
for i = 1, n do
  if cost > burst[i] then
    local ahead = math.max(tats[i], now) - now
    return {2, i - 1, remaining(i, ahead), ahead, 0, corrupt}
  end
end
local new = {}
local deny, wait = 0, 0
for i = 1, n do
  local tat = math.max(tats[i], now)
  new[i] = tat + cost * em[i]
  local ahead = new[i] - now
  if ahead > cap[i] and (deny == 0 or ahead - cap[i] > wait) then
    deny = i
    wait = ahead - cap[i]
  end
end
if deny > 0 then
  local ahead = math.max(tats[deny], now) - now
  return {1, deny - 1, remaining(deny, ahead), ahead, wait, corrupt}
end
local best, best_left, best_ahead = 1, -1, 0
local latest = now
local pairs_to_set = {}
for i = 1, n do
  local t = tats[i]
  if cost > 0 then t = new[i] end
  if t > latest then latest = t end
  pairs_to_set[#pairs_to_set + 1] = fields[i]
  pairs_to_set[#pairs_to_set + 1] = string.format('%d', t)
  local ahead = math.max(t, now) - now
  local left = remaining(i, ahead)
  if best_left < 0 or left < best_left then
    best, best_left, best_ahead = i, left, ahead
  end
end
if cost > 0 or corrupt > 0 then
  redis.call('HSET', key, unpack(pairs_to_set))
  -- The state means nothing once every TAT has passed: let Redis drop it then.
  redis.call('PEXPIRE', key, math.floor((latest - now) / 1000) + 1)
end
return {0, best - 1, best_left, best_ahead, 0, corrupt}
