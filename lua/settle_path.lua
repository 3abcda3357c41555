-- settle_path.lua: reconcile one request's actual usage on every cell of the path its
-- decision was charged on (decide_path.lua), once per request id, atomically. Mirrors
-- settle_path() in native/core.pyx: each cell is settle.lua's budget and token-bucket
-- rules with its own cost difference (its unit) and its own period start.
--
-- KEYS     one per cell, in path order (cell.lua); then the settled marker of the
--          request id; then (optional) the ledger's spend hash of the requesting tenant
--          (single node only: a cluster writes it in a second call)
-- ARGV[1]  clock override in µs ("0" in production)
-- ARGV[2]  delta tokens (actual minus charged, the same on every cell)
-- ARGV[3]  marker TTL in ms
-- ARGV[4]  number of cells n
-- then per cell: rpm, tpm, burst, budget (-1 = none), period, delta cost, period start µs
--          of its charge (-1 = unknown: the current period), and a calendar window's start,
--          end and next end (period 6; else 0 0 0: cell.lua, cell_bounds)
-- then, optional: the request's spend (settle.lua's ARGV[10..16])
-- Reply: {applied (1/0), the first cell's budget spent after (-1 without), now (µs)}

-- (common.lua, cell.lua and ledger_spend.lua are prepended at load)

local now = clock_us(ARGV[1])
local function clamp_delta(x)
  if x > MAX_COST then return MAX_COST end
  if x < -MAX_COST then return -MAX_COST end
  return x
end
local d_tokens = clamp_delta(tonumber(ARGV[2]))
local n = tonumber(ARGV[4])
local marker = KEYS[n + 1]
local first_spent = -1

if not redis.call('SET', marker, '1', 'NX', 'PX', tonumber(ARGV[3])) then
  if tonumber(ARGV[8]) >= 0 then
    local r = cell_read(redis.call('GET', KEYS[1]))
    first_spent = r and stored_spend(r[6]) or 0
  end
  return {0, first_spent, now}
end

local stored = redis.call('MGET', unpack(KEYS, 1, n))
local at = 5
for i = 1, n do
  local c = {rpm = tonumber(ARGV[at]), tpm = tonumber(ARGV[at + 1]), burst = tonumber(ARGV[at + 2]),
             budget = tonumber(ARGV[at + 3]), period = tonumber(ARGV[at + 4]), pe = NO_END,
             ws = tonumber(ARGV[at + 7]), we = tonumber(ARGV[at + 8]), wn = tonumber(ARGV[at + 9])}
  local d_cost, charge_start = clamp_delta(tonumber(ARGV[at + 5])), tonumber(ARGV[at + 6])
  at = at + 10
  c.req_cap, c.req_rate = c.rpm * c.burst, c.rpm / 60e6
  c.tok_cap, c.tok_rate = c.tpm * c.burst, c.tpm / 60e6
  local r = cell_read(stored[i])
  local s = r and {r[1], r[2], r[3], r[4], r[5], r[6]} or {0, 0, 0, 0, -1, 0}
  local changed = false
  if c.tpm > 0 and d_tokens ~= 0 then
    local level = cell_level(r, 3, c.tok_cap, c.tok_rate, now) - d_tokens
    if level > c.tok_cap then level = c.tok_cap end
    s[3], s[4], changed = level, now, true
  end
  if c.budget >= 0 then
    local pstart, pend = cell_bounds(now, c, r and r[5])
    c.pe = pend
    local spent = 0
    if s[5] == pstart then spent = stored_spend(s[6]) end
    if charge_start == pstart or charge_start < 0 or d_cost > 0 then
      spent = add_spend(spent, d_cost)
    end
    s[5], s[6], changed = pstart, spent, true
    if i == 1 then first_spent = spent end
  end
  if changed then
    -- the request bucket keeps its stored level; its TTL part is measured from it, which
    -- can only keep the key longer than needed (a missing key reads full)
    if r == nil and c.rpm > 0 then s[1], s[2] = c.req_cap, now end
    cell_write(KEYS[i], s, c, now)
  end
end

if KEYS[n + 2] and ARGV[at] then
  spend_add(KEYS[n + 2], now, ARGV[at], ARGV[at + 1], ARGV[at + 2], ARGV[at + 3],
            ARGV[at + 4], ARGV[at + 5], ARGV[at + 6])
end
return {1, first_spent, now}
