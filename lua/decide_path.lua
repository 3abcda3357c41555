-- decide_path.lua: one decision over a path of cells (a holder, its other windows, its
-- model's cell, its parents up to the root), atomically: every cell admits and is charged,
-- or none is. Mirrors decide_path() in native/core.pyx rule for rule; a one-cell path is
-- never sent here (decide.lua decides it, as before). tests/core/test_lua_path.py holds
-- it to tests/core/reference_model.py; docs/budgets.md explains the model.
--
-- This file defines decide_path(KEYS, ARGV); an entry appended at load calls it:
-- decide_path_one.lua (one decision) or decide_path_batch.lua (the path decisions queued
-- in one event-loop tick, in one script call; batch.lua's framing, key counts per item).
-- Below, KEYS and ARGV are the one decision's.
--
-- KEYS     one per cell, in path order (cell.lua: buckets and budget in one string). All
--          keys of a tree carry the ROOT's hash tag (kt:{root}:c:<cell>): one slot on a
--          cluster, one script call, one MGET.
-- ARGV[1]  clock override in µs ("0" in production: the server's TIME)
-- ARGV[2..6]  the request: tier asked, input, output, firm tokens, commit_on_deny (0/1)
-- ARGV[7]  number of cells n
-- ARGV[8]  number of tiers t; ARGV[9..8+2t] nano-USD per input, output token per tier
--          (one request's prices: every USD cell's; a tokens cell counts tokens)
-- ARGV[9+2t] every cell's limits, packed (struct '<ddddddd' per cell, in path order):
--          rpm, tpm, burst, budget (-1 = none), budget_in_usd (0/1), period, low_water
--          (decide.lua's meanings; doubles hold each exactly, burst and low_water bit for
--          bit as the core has them), and after a cell of period 6 (a calendar window: a
--          time zone, an anchor) '<ddd': the window's start and end and the next one's
--          end, computed by the sidecar (cell.lua, cell_bounds)
-- Why so compact: Redis turns every KEYS and ARGV entry into a Lua string before the
-- script runs, and each redis.call and each number parsed from text costs more than the
-- arithmetic around it: one key per cell, the limits in one packed argument, one MGET and
-- one SET per cell keep a three-level decision near a one-level one
-- (bench/holders_cost.py).
-- Reply: decide.lua's 17 integers (the header fields are the first cell's), then n, the
-- index of the cell that refused or downgraded (-1: none), then per cell the cost it was
-- charged (its unit) and its budget period start: 19 + 2n integers, an odd count, which
-- no other decision reply has (17, 20).
--
-- Leases never cover a path of several cells (docs/budgets.md): no lease sweep here.
-- Held spend (common.lua, held_add) is not kept for path cells yet (docs/budgets.md).

-- (common.lua and cell.lua are prepended at load)

local function decide_path(KEYS, ARGV)

local now = clock_us(ARGV[1])
local tier, input, output = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local firm, commit_on_deny = tonumber(ARGV[5]), ARGV[6] == '1'
local n = tonumber(ARGV[7])

-- the cells' limits, and the keys each uses
local ntiers = tonumber(ARGV[8])
local prices = 9
local C = {}
local stored = redis.call('MGET', unpack(KEYS))
local packed, at = ARGV[9 + 2 * ntiers], 1
for i = 1, n do
  local rpm, tpm, burst, budget, in_usd, period, low_water, ws, we, wn
  rpm, tpm, burst, budget, in_usd, period, low_water, at = struct.unpack('<ddddddd', packed, at)
  if period == 6 then ws, we, wn, at = struct.unpack('<ddd', packed, at) end
  C[i] = {rpm = rpm, tpm = tpm, burst = burst, budget = budget, in_usd = in_usd == 1,
          period = period, low_water = low_water, ws = ws, we = we, wn = wn,
          r = cell_read(stored[i]), cost = 0,
          remaining = 0, ps = 0, pe = NO_END, spent = 0, new_period = false, req_level = 0,
          tok_level = 0, req_cap = rpm * burst, tok_cap = tpm * burst, req_rate = rpm / 60e6,
          tok_rate = tpm / 60e6}
end

local function wait_us(deficit, rate)
  if deficit <= 0 then return 0 end
  local w = deficit / rate
  if w >= MAX_WAIT_US then return MAX_WAIT_US end
  return math.ceil(w)
end

local kind, reason, cell, retry_us = 0, 0, -1, 0
-- 0. beyond MAX_TOKENS: too large for every holder
if input > MAX_TOKENS or output > MAX_TOKENS then
  kind, reason, cell = 4, 4, 0
  if input > MAX_TOKENS then input = MAX_TOKENS end
  if output > MAX_TOKENS then output = MAX_TOKENS end
end
local tokens = input + output
-- 1. the soft part trimmed to each token bucket in turn
for i = 1, n do
  local c = C[i]
  if kind == 0 and c.tpm > 0 and tokens > c.tok_cap then
    if firm > c.tok_cap then
      kind, reason, cell = 4, 2, i - 1
    else
      output = math.floor(c.tok_cap) - input
      if output < 0 then output = 0 end
      tokens = input + output
    end
  end
end
-- 2. budgets: periods from the clock; one tier down if any cell is below its low water
local down = -1
for i = 1, n do
  local c = C[i]
  if c.budget >= 0 then
    c.ps, c.pe = cell_bounds(now, c, c.r and c.r[5])
    c.new_period = c.r == nil or c.r[5] ~= c.ps
    if not c.new_period then c.spent = stored_spend(c.r[6]) end
    c.remaining = c.budget - c.spent
    if c.remaining < c.low_water * c.budget and tier + 1 < ntiers and down < 0 then
      down = i - 1
    end
  end
end
if down >= 0 then
  tier = tier + 1
  if kind == 0 then kind, cell = 1, down end
end
-- the cost at the tier it goes to, each cell in its unit; too large at any cell is the
-- answer (permanent), else the first cell without room refuses, retry at the latest end
-- (one pass: the prices read once)
local pin, pout = tonumber(ARGV[prices + 2 * tier]), tonumber(ARGV[prices + 2 * tier + 1])
local large, short = -1, -1
for i = 1, n do
  local c = C[i]
  if c.budget >= 0 then
    if c.in_usd then c.cost = input * pin + output * pout else c.cost = input + output end
    if c.cost > MAX_COST then c.cost = MAX_COST end
    if c.cost > c.budget then
      if large < 0 then large = i - 1 end
    elseif c.cost > c.remaining then
      if short < 0 then short = i - 1 end
      if c.pe ~= NO_END and c.pe - now > retry_us then retry_us = c.pe - now end
    end
  end
end
if kind <= 1 and large >= 0 then
  kind, reason, cell, retry_us = 4, 3, large, 0
elseif kind <= 1 and short >= 0 then
  kind, reason, cell = 3, 3, short
else
  retry_us = 0
end
-- 3. buckets: the cell that must wait longest refuses
for i = 1, n do
  local c = C[i]
  if c.rpm > 0 then c.req_level = cell_level(c.r, 1, c.req_cap, c.req_rate, now) end
  if c.tpm > 0 then c.tok_level = cell_level(c.r, 3, c.tok_cap, c.tok_rate, now) end
end
if kind <= 1 then
  local best = 0
  for i = 1, n do
    local c = C[i]
    local wr, wt = 0, 0
    if c.rpm > 0 and c.req_level < 1 then wr = (1 - c.req_level) / c.req_rate end
    if c.tpm > 0 and c.tok_level < tokens then wt = (tokens - c.tok_level) / c.tok_rate end
    local w = wr
    if wt > wr then w = wt end
    if w > 0 and w > best then
      best, cell = w, i - 1
      if wr >= wt then reason = 1 else reason = 2 end
    end
  end
  if best > 0 then kind, retry_us = 2, best end
end
-- 4. commit: every cell or none; refilled levels are written either way (as the core)
local admitted = kind <= 1 or commit_on_deny
local charges = {}
for i = 1, n do
  local c = C[i]
  if admitted then
    if c.rpm > 0 then c.req_level = c.req_level - 1 end
    if c.tpm > 0 then c.tok_level = c.tok_level - tokens end
  end
  if c.budget >= 0 and admitted then c.spent = add_spend(c.spent, c.cost) end
  -- written when a bucket was refilled (bookkeeping, as the core), a period started or a
  -- charge was made; a cell with nothing to keep is never written
  if c.rpm > 0 or c.tpm > 0 or (c.budget >= 0 and (c.new_period or (admitted and c.cost ~= 0))) then
    local s = c.r or {0, 0, 0, 0, -1, 0}  -- the cell's own copy: updated in place
    if c.rpm > 0 then s[1], s[2] = c.req_level, now end
    if c.tpm > 0 then s[3], s[4] = c.tok_level, now end
    if c.budget >= 0 then s[5], s[6] = c.ps, c.spent end
    -- a budget alone in its period keeps the TTL its period's start set
    cell_write(KEYS[i], s, c, now, c.rpm == 0 and c.tpm == 0 and not c.new_period)
  end
  if c.budget >= 0 then c.remaining = c.budget - c.spent end
  charges[2 * i - 1] = admitted and c.cost or 0
  charges[2 * i] = c.budget >= 0 and c.ps or 0
end
if kind == 0 then cell = -1 end

local retry_after_s = 0
if retry_us > MAX_WAIT_US then retry_us = MAX_WAIT_US end
if retry_us > 0 then
  retry_after_s = math.ceil(retry_us / US)
  if retry_after_s < 1 then retry_after_s = 1 end
end
local function remaining(level, limit)
  if level <= 0 then return 0 end
  if level >= limit then return limit end
  return math.floor(level)
end
local f = C[1]
local rem_req, reset_req, rem_tok, reset_tok = 0, 0, 0, 0
if f.rpm > 0 then rem_req, reset_req = remaining(f.req_level, f.rpm), wait_us(f.rpm - f.req_level, f.req_rate) end
if f.tpm > 0 then rem_tok, reset_tok = remaining(f.tok_level, f.tpm), wait_us(f.tpm - f.tok_level, f.tok_rate) end
local b_rem, b_reset, ps_out = 0, 0, 0
if f.budget >= 0 then
  b_rem = f.remaining > 0 and f.remaining or 0
  if f.pe ~= NO_END then b_reset = f.pe - now end
  ps_out = f.ps
end
local charged_tokens, charged_cost = 0, 0
if admitted then charged_tokens, charged_cost = tokens, f.cost end
local out = {kind, reason, tier, retry_after_s, f.rpm, rem_req, reset_req, f.tpm, rem_tok,
             reset_tok, f.budget, b_rem, b_reset, charged_tokens, charged_cost, ps_out,
             math.ceil(retry_us), n, cell}
for i = 1, 2 * n do out[19 + i] = charges[i] end
return out
end
