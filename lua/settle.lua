-- settle.lua: reconcile one request's actual usage with what decide.lua charged.
-- Mirrors settle() in native/core.pyx; idempotent per request id.
--
-- KEYS[1]  token bucket hash {l, t}                 kt:{tenant}:tpm
-- KEYS[2]  budget hash {ps, s}                      kt:{tenant}:budget
-- KEYS[3]  settled marker for the request id        kt:{tenant}:settled:<request id>
-- ARGV[1]  clock override in µs ("0" in production: the server's TIME)
-- ARGV[2..5]  tpm, burst, budget (-1 = none), period (0..4, as decide.lua)
-- ARGV[6..8]  delta tokens, delta cost (actual minus charged; negative = refund),
--             period start µs of the charge (-1 = unknown: the current period)
-- ARGV[9]  marker TTL in ms (how long a repeated report of the id is recognised)
-- Reply: {applied (1/0), budget spent after (-1 without a budget)}
--
-- A refund never reaches into a closed period; extra usage of a request charged in a
-- closed period lands in the current one: spend is never lost.

local US = 1000000
local DAY_US = 86400000000
local NO_END = 4611686018427387904

local now = tonumber(ARGV[1])
if now == 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * US + tonumber(t[2])
end
local tpm, burst, budget, period = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local d_tokens, d_cost, charge_start = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])

if not redis.call('SET', KEYS[3], '1', 'NX', 'PX', tonumber(ARGV[9])) then
  local s = -1
  if budget >= 0 then s = tonumber(redis.call('HGET', KEYS[2], 's')) or 0 end
  return {0, s}
end

local function floordiv(a, b) return math.floor(a / b) end
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

if tpm > 0 and d_tokens ~= 0 then
  local cap, rate = tpm * burst, tpm / 60e6
  local st = redis.call('HMGET', KEYS[1], 'l', 't')
  local level, last = tonumber(st[1]), tonumber(st[2])
  if level == nil or level < 0 then
    level = cap
  elseif now - last > 0 then
    level = level + (now - last) * rate
    if level > cap then level = cap end
  end
  level = level - d_tokens
  if level > cap then level = cap end
  redis.call('HSET', KEYS[1], 'l', string.format('%.17g', level), 't', string.format('%d', now))
  local ms = 1000
  if cap - level > 0 then ms = ms + math.ceil((cap - level) / rate / 1000) end
  redis.call('PEXPIRE', KEYS[1], ms)
end

if budget < 0 then return {1, -1} end
local pstart, pend = period_bounds(now, period)
local b = redis.call('HMGET', KEYS[2], 'ps', 's')
local spent = 0
local new_period = tonumber(b[1]) ~= pstart
if not new_period then spent = tonumber(b[2]) or 0 end
if charge_start == pstart or charge_start < 0 then
  spent = spent + d_cost
  if spent < 0 then spent = 0 end
elseif d_cost > 0 then
  spent = spent + d_cost
end
redis.call('HSET', KEYS[2], 'ps', string.format('%d', pstart), 's', string.format('%d', spent))
if new_period and pend ~= NO_END then
  redis.call('PEXPIREAT', KEYS[2], math.floor((pend + DAY_US) / 1000))
end
return {1, spent}
