-- settle.lua: reconcile one request's actual usage with what decide.lua charged.
-- Mirrors settle() in native/core.pyx; idempotent per request id.
--
-- KEYS[1]  token bucket (common.lua)               kt:{tenant}:tpm
-- KEYS[2]  budget hash {ps, s}                      kt:{tenant}:budget
-- KEYS[3]  settled marker for the request id        kt:{tenant}:settled:<request id>
-- ARGV[1]  clock override in µs ("0" in production: the server's TIME)
-- ARGV[2..5]  tpm, burst, budget (-1 = none), period (0..4, as decide.lua)
-- ARGV[6..8]  delta tokens, delta cost (actual minus charged; negative = refund),
--             period start µs of the charge (-1 = unknown: the current period)
-- ARGV[9]  marker TTL in ms (how long a repeated report of the id is recognised)
-- KEYS[4]  the ledger's spend hash (ledger_spend.lua)       kt:{tenant}:spend
-- ARGV[10..16]  optional, the request's spend: model, requests, input, output, cache read,
--          cache write tokens, nano-USD (absent: nothing recorded)
-- ARGV[17] with them: 1 when the budget is in nano-USD, 0 in tokens (what the usage cost
--          the budget: its nano-USD, or its input + output tokens)
-- Reply: {applied (1/0), budget spent after (-1 without a budget), now (µs, the clock
-- that dated the spend: the ledger's event carries it, so both books agree on the day)}
--
-- A refund never reaches into a closed period; extra usage of a request charged in a
-- closed period lands in the current one: spend is never lost.

-- (common.lua, prepended at load, defines NO_END, US, DAY_US, clock_us, period_bounds,
-- bucket_level, bucket_store; ledger_spend.lua, prepended after it, spend_add)

local now = clock_us(ARGV[1])
-- leases of this tenant past their end give back what their holders did not use first
-- (common.lua, "Capacity leases"; the keys are named from KEYS[2]'s tag, same slot)
sweep_leases(string.sub(KEYS[2], 1, -7), now)
local tpm, burst, budget, period = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local d_tokens, d_cost, charge_start = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
-- clamped as the core clamps them (usage reports bound them long before)
local function clamp_delta(x)
  if x > MAX_COST then return MAX_COST end
  if x < -MAX_COST then return -MAX_COST end
  return x
end
d_tokens, d_cost = clamp_delta(d_tokens), clamp_delta(d_cost)

if not redis.call('SET', KEYS[3], '1', 'NX', 'PX', tonumber(ARGV[9])) then
  local s = -1
  if budget >= 0 then s = stored_spend(redis.call('HGET', KEYS[2], 's')) end
  return {0, s, now}
end

-- the ledger: the request's spend, in the same atomic step as the budget's correction
if KEYS[4] and ARGV[10] then
  spend_add(KEYS[4], now, ARGV[10], ARGV[11], ARGV[12], ARGV[13], ARGV[14], ARGV[15], ARGV[16])
end
-- what the decision charged (the usage's cost to the budget less this correction) is no
-- longer held (common.lua, held_add): held in the period it was charged to
if KEYS[4] and budget >= 0 and charge_start >= 0 then
  local actual = 0
  if ARGV[10] then
    if ARGV[17] == '1' then
      actual = tonumber(ARGV[16])
    elseif ARGV[17] == '0' then
      actual = tonumber(ARGV[12]) + tonumber(ARGV[13])
    else
      actual = nil  -- a caller that does not say the unit: nothing to release by
    end
  end
  if actual ~= nil then held_add(string.sub(KEYS[4], 1, -6), charge_start, d_cost - actual) end
end

if tpm > 0 and d_tokens ~= 0 then
  local cap, rate = tpm * burst, tpm / 60e6
  local level = bucket_level(KEYS[1], cap, rate, now) - d_tokens
  if level > cap then level = cap end
  bucket_store(KEYS[1], level, cap, rate, now)
end

if budget < 0 then return {1, -1, now} end
local pstart, pend = period_bounds(now, period)
local b = redis.call('HMGET', KEYS[2], 'ps', 's')
local spent = 0
local new_period = tonumber(b[1]) ~= pstart
if not new_period then spent = stored_spend(b[2]) end
if charge_start == pstart or charge_start < 0 then
  spent = add_spend(spent, d_cost)
elseif d_cost > 0 then
  spent = add_spend(spent, d_cost)
end
redis.call('HSET', KEYS[2], 'ps', string.format('%d', pstart), 's', string.format('%d', spent))
if new_period and pend ~= NO_END then
  expire_after_period(KEYS[2], pend, now)
end
return {1, spent, now}
