-- common.lua: the calendar and the bucket storage shared by decide.lua and settle.lua.
-- Not a script of its own: sidecar/backends/redis.py prepends it to each script before
-- SCRIPT LOAD, so the UTC period rules and the bucket refill exist once in Lua (and once
-- in native/core.pyx).

local NO_END = 4611686018427387904
local US = 1000000
local DAY_US = 86400000000
-- Bounds, the core's (native/core.pyx): numbers here are doubles, exact for integers up
-- to 2^53, and every integer these scripts compute stays there. A count above MAX_TOKENS
-- is too large (reason 4, size); a cost is capped at MAX_COST (2^53, above any budget; a
-- true product beyond it rounds to >= 2^53, so the cap gives the core's value); spend
-- saturates at MAX_COST; settlement deltas are clamped to +-MAX_COST; waits to MAX_WAIT_US.
local MAX_TOKENS = 34359738367
local MAX_COST = 9007199254740992
local MAX_WAIT_US = 1e15

-- spend after adding `amount`, in [0, MAX_COST] (amount within +-MAX_COST: exact enough
-- that a true sum beyond MAX_COST still reads beyond it)
local function add_spend(spent, amount)
  if spent > MAX_COST then spent = MAX_COST elseif spent < 0 then spent = 0 end
  spent = spent + amount
  if spent > MAX_COST then return MAX_COST end
  if spent > 0 then return spent end
  return 0
end

-- a stored spend as a number in [0, MAX_COST] (absent or unreadable: 0)
local function stored_spend(v)
  local n = tonumber(v)
  if n == nil or n ~= n or n < 0 then return 0 end
  if n > MAX_COST then return MAX_COST end
  return n
end

-- the clock: a test override (ARGV[1] > 0) or the server's TIME, in µs. TIME is read
-- once per script call: the decisions of one batch are taken at one instant (the call
-- is atomic anyway), and a Redis call per decision is saved.
local server_now = nil
local function clock_us(override)
  local now = tonumber(override)
  if now == 0 then
    if server_now == nil then
      local t = redis.call('TIME')
      server_now = tonumber(t[1]) * US + tonumber(t[2])
    end
    now = server_now
  end
  return now
end

-- A budget key lives until a day after its period ends. The TTL is set relative to the
-- script's own `now` (PEXPIRE, not PEXPIREAT): under a clock override the period and its
-- expiry then come from one clock, and in production (now = the server's TIME) the two
-- are the same instant. An absolute PEXPIREAT computed from an overridden clock would be
-- judged against the server's wall clock, and a period in the past expired at once.
local function expire_after_period(key, pend, now)
  redis.call('PEXPIRE', key, math.max(1, math.floor((pend + DAY_US - now) / 1000)))
end

local function floordiv(a, b) return math.floor(a / b) end

-- proleptic Gregorian calendar (Howard Hinnant's algorithms), days since 1970-01-01
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = floordiv(y >= 0 and y or y - 399, 400)
  local yoe = y - era * 400
  local mp = m > 2 and m - 3 or m + 9
  local doy = floordiv(153 * mp + 2, 5) + d - 1
  local doe = yoe * 365 + floordiv(yoe, 4) - floordiv(yoe, 100) + doy
  return era * 146097 + doe - 719468
end

local function year_month(days)
  local z = days + 719468
  local era = floordiv(z >= 0 and z or z - 146096, 146097)
  local doe = z - era * 146097
  local yoe = floordiv(doe - floordiv(doe, 1460) + floordiv(doe, 36524) - floordiv(doe, 146096), 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + floordiv(yoe, 4) - floordiv(yoe, 100))
  local mp = floordiv(5 * doy + 2, 153)
  local m = mp < 10 and mp + 3 or mp - 9
  if m <= 2 then y = y + 1 end
  return y, m
end

local function period_bounds(t, p)
  if p == 4 then return 0, NO_END end
  if p == 3 then
    local days = (t - math.fmod(t, DAY_US)) / DAY_US
    local y, m = year_month(days)
    local s = days_from_civil(y, m, 1) * DAY_US
    if m == 12 then return s, days_from_civil(y + 1, 1, 1) * DAY_US end
    return s, days_from_civil(y, m + 1, 1) * DAY_US
  end
  local size = (p == 0 and 60 or (p == 1 and 3600 or 86400)) * US
  local s = t - math.fmod(t, size)
  return s, s + size
end

-- A bucket is one string, "<level> <µs of its last update>", whose TTL is the time it
-- takes to be full again plus 1 s: a missing bucket reads as full, which is exactly its
-- state by then, so expiry never changes a decision. One SET ... PX writes level and TTL
-- together (as a hash it took HSET and PEXPIRE: a Redis call more per bucket per
-- decision). Levels are written with %.17g (tostring keeps 14 digits, which would drift
-- from the core).

-- the level now: the stored one refilled at `rate` per µs, never above `cap`. A missing
-- key is a bucket never used (or full long enough to expire): full. A stored level below
-- zero is a debt (a settlement larger than the estimate, or shadow mode) and refills from
-- where it is; no stored level means "full" (it once did: TPM leaked). The clamp applies even when no time passed,
-- so a policy reload that lowered the capacity takes effect at once.
local function bucket_level(key, cap, rate, now)
  local level, last
  -- pcall: a key of another type fails GET with WRONGTYPE instead of failing the decision
  local v = redis.pcall('GET', key)
  if type(v) == 'string' then
    local sp = string.find(v, ' ', 1, true)
    if sp ~= nil then
      level, last = tonumber(string.sub(v, 1, sp - 1)), tonumber(string.sub(v, sp + 1))
    end
  elseif type(v) == 'table' and v.err ~= nil then
    -- a bucket left as a hash {l = level, t = last µs} by the earlier format: read it (a
    -- debt it holds still counts); the next write replaces it with the string form
    local h = redis.pcall('HMGET', key, 'l', 't')
    if type(h) == 'table' and h.err == nil then level, last = tonumber(h[1]), tonumber(h[2]) end
  end
  -- unreadable (absent, malformed, or not finite) reads as full, as an expired key would
  if level == nil or last == nil or level ~= level or level == math.huge or level == -math.huge then
    return cap
  end
  local elapsed = now - last
  if elapsed > 0 then level = level + elapsed * rate end
  if level > cap then return cap end
  return level
end

local function bucket_store(key, level, cap, rate, now)
  local ms = 1000
  if cap - level > 0 then ms = ms + math.ceil((cap - level) / rate / 1000) end
  redis.call('SET', key, string.format('%.17g %d', level, now), 'PX', ms)
end
