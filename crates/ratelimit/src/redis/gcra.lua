-- stanchion-ratelimit: GCRA over several quotas, all or nothing, for a batch of requests in one
-- round trip. The same arithmetic as src/gcra.rs (microseconds, absolute time).
--
-- KEYS[k]  the state of request k: one string of n + 1 little-endian doubles, the key's expiry
--          in Unix milliseconds, then each quota's TAT in microseconds (integers below 2^53,
--          so exact). Binary because Lua reads and writes it several times faster than
--          decimal text.
-- ARGV[1]  now in microseconds, or 0 to use the server's TIME
-- ARGV[2]  1 when no key appears twice in KEYS, else 0
-- ARGV[3]  S, the number of distinct limit sets in the batch; then per set: its number of
--          quotas n (1 to 4) and, per quota, emission interval, capacity (burst * interval),
--          burst
-- then     either 0 and, per request k, its cost and the (1-based) index of its limit set,
--          or 1 and one cost for every request, all of set 1
-- Returns one string of little-endian doubles, 4 per request, each a whole number: verdict
-- (0 allowed, 1 denied, 2 impossible, 3 the key holds another type) + 4 * quota index (0-based)
-- + 16 * corrupt values; remaining; reset_after_us; retry_after_us.
--
-- Cost per request on the server: a share of one MGET and one SET. The SET keeps the key's
-- TTL (KEEPTTL, the cheapest write) while the stored expiry still covers the newest TAT, and
-- otherwise moves it to the newest TAT plus SLACK_MS (SET .. PX): a key outlives its state by
-- at most SLACK_MS.
local SLACK_MS = 1000
local MAX_EXACT = 9007199254740992 -- 2^53
local FORMATS = { '<dd', '<ddd', '<dddd', '<ddddd' }
local unpack_state, pack_state = struct.unpack, struct.pack
local call, keys, argv = redis.call, KEYS, ARGV

local now = tonumber(argv[1])
if now == 0 then
  local t = call('TIME')
  now = t[1] * 1000000 + t[2]
end
local now_ms = (now - now % 1000) / 1000

local distinct = argv[2] == '1'
local sets = {}
local a = 4
for s = 1, tonumber(argv[3]) do
  local n = tonumber(argv[a])
  local set = { n = n, fmt = FORMATS[n], size = 8 * (n + 1) }
  for i = 1, 3 * n do
    set[i] = tonumber(argv[a + i])
  end
  sets[s] = set
  a = a + 1 + 3 * n
end
local uniform = argv[a] == '1'
local uniform_cost = uniform and tonumber(argv[a + 1])
a = a + 1

-- A string, or false for a missing key or one of another type (told apart when writing).
local stored = call('MGET', unpack(keys))

-- What this call wrote, by key, so a key checked twice in one batch sees its first check
-- (kept only when a key repeats).
local written = {}
local out = {}
local o = 0
local tats, new = { 0, 0, 0, 0 }, { 0, 0, 0, 0 }
for k = 1, #keys do
  local key = keys[k]
  local cost, set
  if uniform then
    cost, set = uniform_cost, sets[1]
  else
    cost, set = tonumber(argv[a]), sets[tonumber(argv[a + 1])]
    a = a + 2
  end
  local n = set.n
  local value = stored[k]
  if not distinct then
    local w = written[key]
    if w ~= nil then value = w end
  end
  local expiry, corrupt = nil, 0
  local verdict, quota, left_out, ahead_out, wait = 0, 0, -1, 0, 0
  local latest = now
  if n == 1 and (not value or #value == 16) then
    -- One quota, the common case: the steps of the general path below, without its tables.
    local tat = 0
    if value then
      local e, t = unpack_state('<dd', value)
      if e ~= e or e < 0 or e > MAX_EXACT or e % 1 ~= 0 then corrupt = 1 else expiry = e end
      if t ~= t or t < 0 or t > MAX_EXACT or t % 1 ~= 0 then corrupt = corrupt + 1 else tat = t end
    end
    local em, cap = set[1], set[2]
    if tat < now then tat = now end
    if cost > set[3] then
      local left = cap - (tat - now)
      if left < 0 then left = 0 end
      verdict, left_out, ahead_out = 2, (left - left % em) / em, tat - now
    else
      local next = tat + cost * em
      local ahead = next - now
      if ahead > cap then
        local left = cap - (tat - now)
        if left < 0 then left = 0 end
        verdict, left_out, ahead_out, wait = 1, (left - left % em) / em, tat - now, ahead - cap
      else
        if cost == 0 then ahead = tat - now end
        local left = cap - ahead
        left_out, ahead_out = (left - left % em) / em, ahead
      end
      new[1], latest = next, next
    end
  else
    tats[1], tats[2], tats[3], tats[4] = 0, 0, 0, 0
    if value then
      local len, m = #value, n
      if len == set.size then
        expiry, tats[1], tats[2], tats[3], tats[4] = unpack_state(set.fmt, value)
      elseif len % 8 == 0 and len >= 16 and len <= 40 then
        -- Written under another number of quotas: keep the ones both share.
        m = len / 8 - 1
        expiry, tats[1], tats[2], tats[3], tats[4] = unpack_state(FORMATS[m], value)
      else
        corrupt = 1
      end
      -- unpack's last result is a position, not a TAT.
      for i = m + 1, 4 do tats[i] = 0 end
      if corrupt == 0 then
        if expiry ~= expiry or expiry < 0 or expiry > MAX_EXACT or expiry % 1 ~= 0 then
          corrupt, expiry = 1, nil
        end
        for i = 1, n do
          local t = tats[i]
          if t ~= t or t < 0 or t > MAX_EXACT or t % 1 ~= 0 then
            corrupt, tats[i] = corrupt + 1, 0
          end
        end
      end
    end

    for i = 1, n do
      local em, cap = set[3 * i - 2], set[3 * i - 1]
      local tat = tats[i]
      if tat < now then tat = now end
      if cost > set[3 * i] then
        local left = cap - (tat - now)
        if left < 0 then left = 0 end
        verdict, quota, left_out, ahead_out, wait = 2, i - 1, (left - left % em) / em, tat - now, 0
        break
      end
      local next = tat + cost * em
      local ahead = next - now
      if ahead > cap then
        if verdict == 0 or ahead - cap > wait then
          local left = cap - (tat - now)
          if left < 0 then left = 0 end
          verdict, quota, left_out, ahead_out, wait =
            1, i - 1, (left - left % em) / em, tat - now, ahead - cap
        end
      elseif verdict == 0 then
        local left
        if cost == 0 then
          ahead = tat - now
          left = cap - ahead
        else
          left = cap - ahead
        end
        left = (left - left % em) / em
        if left_out < 0 or left < left_out then
          quota, left_out, ahead_out = i - 1, left, ahead
        end
      end
      new[i] = next
      if next > latest then latest = next end
    end
  end

  if verdict == 0 and cost > 0 then
    local text
    if value and corrupt == 0 and expiry * 1000 >= latest
      and expiry * 1000 <= latest + (SLACK_MS + 1) * 1000 then
      text = pack_state(set.fmt, expiry, new[1], new[2], new[3], new[4])
      call('SET', key, text, 'KEEPTTL')
    else
      local until_ms = (latest - latest % 1000) / 1000 + 1 + SLACK_MS
      text = pack_state(set.fmt, until_ms, new[1], new[2], new[3], new[4])
      if value then
        call('SET', key, text, 'PX', until_ms - now_ms)
      elseif not call('SET', key, text, 'PX', until_ms - now_ms, 'NX') then
        verdict, text = 3, nil -- MGET read nothing, yet the key exists: it holds another type
      end
    end
    if not distinct then written[key] = text end
  elseif not value then
    -- Nothing written: a missing key and a key of another type both read as nothing; tell them
    -- apart so the caller learns of the latter (rare: only a peek or an impossible cost).
    local kind = call('TYPE', key)
    if (kind.ok or kind) ~= 'none' then verdict = 3 end
  elseif verdict == 0 and corrupt > 0 then
    -- A peek on unreadable state: drop it (it already counted as full capacity).
    call('DEL', key)
    written[key] = false
  end
  if verdict == 3 then
    out[o + 1], out[o + 2], out[o + 3], out[o + 4] = 3, 0, 0, 0
  else
    out[o + 1], out[o + 2], out[o + 3], out[o + 4] =
      verdict + 4 * quota + 16 * corrupt, left_out, ahead_out, wait
  end
  o = o + 4
end
-- One string of doubles: far cheaper to send and to parse than as many integer replies.
return pack_state('<' .. string.rep('d', o), unpack(out, 1, o))
