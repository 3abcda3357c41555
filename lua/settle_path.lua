-- settle_path.lua: reconcile one request's actual usage on every cell of the path its
-- decision was charged on (decide_path.lua), once per request id, atomically. Mirrors
-- settle_path() in native/core.pyx: each cell is settle.lua's budget and token-bucket
-- rules with its own cost difference (its unit) and its own period start.
--
-- KEYS     2 per cell, in path order: token bucket, budget hash; then the settled
--          marker of the request id; then (optional) the ledger's spend hash of the
--          requesting tenant (single node only: a cluster writes it in a second call)
-- ARGV[1]  clock override in µs ("0" in production)
-- ARGV[2]  delta tokens (actual minus charged, the same on every cell)
-- ARGV[3]  marker TTL in ms
-- ARGV[4]  number of cells n
-- then per cell: tpm, burst, budget (-1 = none), period, delta cost, period start µs of
--          its charge (-1 = unknown: the current period)
-- then, optional: the request's spend (settle.lua's ARGV[10..16])
-- Reply: {applied (1/0), the first cell's budget spent after (-1 without), now (µs)}

-- (common.lua and ledger_spend.lua are prepended at load)

local now = clock_us(ARGV[1])
local function clamp_delta(x)
  if x > MAX_COST then return MAX_COST end
  if x < -MAX_COST then return -MAX_COST end
  return x
end
local d_tokens = clamp_delta(tonumber(ARGV[2]))
local n = tonumber(ARGV[4])
local marker = KEYS[2 * n + 1]
local first_spent = -1

if not redis.call('SET', marker, '1', 'NX', 'PX', tonumber(ARGV[3])) then
  if tonumber(ARGV[7]) >= 0 then first_spent = stored_spend(redis.call('HGET', KEYS[2], 's')) end
  return {0, first_spent, now}
end

local at = 5
for i = 1, n do
  local tk, bk = KEYS[2 * i - 1], KEYS[2 * i]
  local tpm, burst, budget, period = tonumber(ARGV[at]), tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2]), tonumber(ARGV[at + 3])
  local d_cost, charge_start = clamp_delta(tonumber(ARGV[at + 4])), tonumber(ARGV[at + 5])
  at = at + 6
  if tpm > 0 and d_tokens ~= 0 then
    local cap, rate = tpm * burst, tpm / 60e6
    local level = bucket_level(tk, cap, rate, now) - d_tokens
    if level > cap then level = cap end
    bucket_store(tk, level, cap, rate, now)
  end
  if budget >= 0 then
    local pstart, pend = period_bounds(now, period)
    local b = redis.call('HMGET', bk, 'ps', 's')
    local spent = 0
    local new_period = tonumber(b[1]) ~= pstart
    if not new_period then spent = stored_spend(b[2]) end
    if charge_start == pstart or charge_start < 0 or d_cost > 0 then
      spent = add_spend(spent, d_cost)
    end
    redis.call('HSET', bk, 'ps', string.format('%d', pstart), 's', string.format('%d', spent))
    if new_period and pend ~= NO_END then expire_after_period(bk, pend, now) end
    if i == 1 then first_spent = spent end
  end
end

if KEYS[2 * n + 2] and ARGV[at] then
  spend_add(KEYS[2 * n + 2], now, ARGV[at], ARGV[at + 1], ARGV[at + 2], ARGV[at + 3],
            ARGV[at + 4], ARGV[at + 5], ARGV[at + 6])
end
return {1, first_spent, now}
