-- stanchion-ratelimit: GCRA over several quotas, all or nothing, for a batch of requests in one
-- round trip. The same arithmetic as src/gcra.rs (microseconds, absolute time).
-- KEYS[k]  the state of request k: its quotas' TATs joined by ':' (one write: SET .. PX)
-- ARGV[1]  now in microseconds, or 0 to use the server's TIME
-- then, per request: cost, number of quotas n, and per quota: emission interval,
--          capacity (burst * interval), burst
-- Returns, per request, 6 integers: verdict (0 allowed, 1 denied, 2 impossible, 3 the key holds
-- another type), quota index (0-based), remaining, reset_after_us, retry_after_us, corrupt values
local now = tonumber(ARGV[1])
if now == 0 then
  local t = redis.call('TIME')
  now = t[1] * 1000000 + t[2]
end
local out = {}
local function push(a, b, c, d, e, f)
  local n = #out
  out[n + 1], out[n + 2], out[n + 3], out[n + 4], out[n + 5], out[n + 6] = a, b, c, d, e, f
end

local function check(key, cost, n, base)
  local stored = redis.pcall('GET', key)
  if type(stored) == 'table' and stored.err then
    return push(3, 0, 0, 0, 0, 0)
  end
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
    local em = tonumber(ARGV[base + 3 * (i - 1)])
    local cap = tonumber(ARGV[base + 3 * (i - 1) + 1])
    local tat = tats[i] or 0
    if tat < now then tat = now end
    if cost > tonumber(ARGV[base + 3 * (i - 1) + 2]) then
      local left = cap - (tat - now)
      if left < 0 then left = 0 end
      return push(2, i - 1, math.floor(left / em), tat - now, 0, corrupt)
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
    return push(1, deny - 1, best_left, best_ahead, wait, corrupt)
  end
  if cost > 0 then
    -- '%d' keeps every digit (tostring would print 16-digit microseconds in exponent form).
    local value = string.format('%d', new[1])
    for i = 2, n do value = value .. ':' .. string.format('%d', new[i]) end
    redis.call('SET', key, value, 'PX', math.floor((latest - now) / 1000) + 1)
  elseif corrupt > 0 then
    redis.call('DEL', key)
  end
  return push(0, best - 1, best_left, best_ahead, 0, corrupt)
end

local a = 2
for k = 1, #KEYS do
  local cost = tonumber(ARGV[a])
  local n = tonumber(ARGV[a + 1])
  check(KEYS[k], cost, n, a + 2)
  a = a + 2 + 3 * n
end
return out
