-- stanchion-ratelimit: GCRA over several quotas, all or nothing, in one round trip.
-- The same arithmetic as src/gcra.rs (microseconds, absolute time).
-- KEYS[1]  the key: a string of the quotas' TATs joined by ':' (one write: SET .. PX)
-- ARGV[1]  now in microseconds, or 0 to use the server's TIME
-- ARGV[2]  cost
-- ARGV[3]  number of quotas n; then per quota: emission interval, capacity (burst * interval), burst
-- Returns {verdict (0 allowed, 1 denied, 2 impossible), quota index (0-based), remaining,
--          reset_after_us, retry_after_us, corrupt values found}
local now = tonumber(ARGV[1])
if now == 0 then
  local t = redis.call('TIME')
  now = t[1] * 1000000 + t[2]
end
local cost = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local stored = redis.call('GET', KEYS[1])
local tats = {}
local corrupt = 0
if stored then
  local i = 0
  for part in string.gmatch(stored, '[^:]+') do
    i = i + 1
    local t = tonumber(part)
    if t == nil or t < 0 or t ~= math.floor(t) then
      corrupt = corrupt + 1
      t = 0
    end
    tats[i] = t
  end
end
local deny, wait, best, best_left, best_ahead, latest = 0, 0, 0, -1, 0, now
local new = {}
for i = 1, n do
  local em = tonumber(ARGV[1 + 3 * i])
  local cap = tonumber(ARGV[2 + 3 * i])
  local tat = tats[i] or 0
  if tat < now then tat = now end
  if cost > tonumber(ARGV[3 + 3 * i]) then
    local left = cap - (tat - now)
    if left < 0 then left = 0 end
    return {2, i - 1, math.floor(left / em), tat - now, 0, corrupt}
  end
  local next = tat + cost * em
  local ahead = next - now
  if ahead > cap then
    if deny == 0 or ahead - cap > wait then
      deny = i
      wait = ahead - cap
      local left = cap - (tat - now)
      if left < 0 then left = 0 end
      best_left = math.floor(left / em)
      best_ahead = tat - now
    end
  elseif deny == 0 then
    local left = math.floor((cap - ahead) / em)
    if cost == 0 then
      left = math.floor((cap - (tat - now)) / em)
      ahead = tat - now
    end
    if best_left < 0 or left < best_left then
      best, best_left, best_ahead = i, left, ahead
    end
  end
  new[i] = next
  if next > latest then latest = next end
end
if deny > 0 then
  return {1, deny - 1, best_left, best_ahead, wait, corrupt}
end
if cost > 0 then
  -- '%d' keeps every digit (tostring would print 16-digit microseconds in exponent form).
  local value = string.format('%d', new[1])
  for i = 2, n do value = value .. ':' .. string.format('%d', new[i]) end
  redis.call('SET', KEYS[1], value, 'PX', math.floor((latest - now) / 1000) + 1)
elseif corrupt > 0 then
  redis.call('DEL', KEYS[1])
end
return {0, best - 1, best_left, best_ahead, 0, corrupt}
