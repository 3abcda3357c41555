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
-- KEYS     3 per cell, in path order: request bucket, token bucket, budget hash (the
--          forms of decide.lua). All keys of a tree carry the ROOT's hash tag
--          (kt:{root}:c:<cell>:rpm...): one slot on a cluster, one script call.
-- ARGV[1]  clock override in µs ("0" in production: the server's TIME)
-- ARGV[2..6]  the request: tier asked, input, output, firm tokens, commit_on_deny (0/1)
-- ARGV[7]  number of cells n
-- then per cell: its limits as decide.lua's ARGV[7..] (rpm, tpm, burst, budget,
--          budget_in_usd, period, low_water, ntiers, then 2 prices per tier)
-- Reply: decide.lua's 17 integers (the header fields are the first cell's), then n, the
-- index of the cell that refused or downgraded (-1: none), then per cell the cost it was
-- charged (its unit) and its budget period start: 19 + 2n integers, an odd count, which
-- no other decision reply has (17, 20).
--
-- Leases never cover a path of several cells (docs/budgets.md): no lease sweep here.
-- Held spend (common.lua, held_add) is not kept for path cells yet (docs/budgets.md).

-- (common.lua is prepended at load)

local function decide_path(KEYS, ARGV)

local now = clock_us(ARGV[1])
local tier, input, output = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local firm, commit_on_deny = tonumber(ARGV[5]), ARGV[6] == '1'
local n = tonumber(ARGV[7])

-- the cells' limits
local C = {}
local at = 8
for i = 1, n do
  local c = {rpm = tonumber(ARGV[at]), tpm = tonumber(ARGV[at + 1]), burst = tonumber(ARGV[at + 2]),
             budget = tonumber(ARGV[at + 3]), in_usd = ARGV[at + 4] == '1',
             period = tonumber(ARGV[at + 5]), low_water = tonumber(ARGV[at + 6]),
             ntiers = tonumber(ARGV[at + 7]), prices = at + 8,
             rk = KEYS[3 * i - 2], tk = KEYS[3 * i - 1], bk = KEYS[3 * i]}
  c.req_cap, c.tok_cap = c.rpm * c.burst, c.tpm * c.burst
  c.req_rate, c.tok_rate = c.rpm / 60e6, c.tpm / 60e6
  at = at + 8 + 2 * c.ntiers
  C[i] = c
end
local ntiers = C[1].ntiers

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
  c.cost, c.remaining, c.ps, c.pe, c.spent, c.new_period = 0, 0, 0, NO_END, 0, false
  if c.budget >= 0 then
    c.ps, c.pe = period_bounds(now, c.period)
    local b = redis.call('HMGET', c.bk, 'ps', 's')
    c.new_period = tonumber(b[1]) ~= c.ps
    if not c.new_period then c.spent = stored_spend(b[2]) end
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
for i = 1, n do
  local c = C[i]
  if c.budget >= 0 then
    if c.in_usd then
      c.cost = input * tonumber(ARGV[c.prices + 2 * tier]) + output * tonumber(ARGV[c.prices + 2 * tier + 1])
    else
      c.cost = input + output
    end
    if c.cost > MAX_COST then c.cost = MAX_COST end
  end
end
if kind <= 1 then
  for i = 1, n do
    local c = C[i]
    if c.budget >= 0 and c.cost > c.budget then
      kind, reason, cell = 4, 3, i - 1
      break
    end
  end
end
if kind <= 1 then
  for i = 1, n do
    local c = C[i]
    if c.budget >= 0 and c.cost > c.remaining then
      if kind <= 1 then kind, reason, cell = 3, 3, i - 1 end
      if c.pe ~= NO_END and c.pe - now > retry_us then retry_us = c.pe - now end
    end
  end
end
-- 3. buckets: the cell that must wait longest refuses
for i = 1, n do
  local c = C[i]
  c.req_level, c.tok_level = 0, 0
  if c.rpm > 0 then c.req_level = bucket_level(c.rk, c.req_cap, c.req_rate, now) end
  if c.tpm > 0 then c.tok_level = bucket_level(c.tk, c.tok_cap, c.tok_rate, now) end
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
  if c.rpm > 0 then bucket_store(c.rk, c.req_level, c.req_cap, c.req_rate, now) end
  if c.tpm > 0 then bucket_store(c.tk, c.tok_level, c.tok_cap, c.tok_rate, now) end
  if c.budget >= 0 then
    if c.new_period or admitted then
      if admitted then c.spent = add_spend(c.spent, c.cost) end
      redis.call('HSET', c.bk, 'ps', string.format('%d', c.ps), 's', string.format('%d', c.spent))
      if c.new_period and c.pe ~= NO_END then expire_after_period(c.bk, c.pe, now) end
    end
    c.remaining = c.budget - c.spent
  end
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
