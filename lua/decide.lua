-- decide.lua: one decision, atomically, on one tenant's shared state.
-- Mirrors decide() in native/core.pyx rule for rule; tests/core/test_lua_reference.py
-- holds both to tests/core/reference_model.py.
--
-- This file defines decide(KEYS, ARGV); an entry file appended at load calls it:
-- decide_one.lua (one decision: the script's own KEYS and ARGV) or decide_batch.lua
-- (the decisions queued in one event-loop tick, one after another in one script call).
-- Below, KEYS and ARGV are the one decision's.
--
-- Why Lua and not MULTI/EXEC: the decision reads state, computes, and writes only
-- if the request is admitted; MULTI/EXEC cannot branch on what it read without a
-- WATCH/retry loop, which under contention on one hot tenant costs round trips
-- and retries. A script is atomic and one round trip, whatever the contention.
--
-- KEYS[1]  request bucket, "<level> <last µs>" (common.lua)   e.g. kt:{acme}:rpm
-- KEYS[2]  token bucket, the same form                         e.g. kt:{acme}:tpm
-- KEYS[3]  budget, hash {ps = period start µs, s = spent}      e.g. kt:{acme}:budget
--          All keys of a tenant share the hash tag {tenant}: one slot on a cluster.
-- ARGV[1]  clock override in µs; "0" in production (the server's TIME is used, so
--          replicas with skewed clocks agree). Tests pass a time to replay sequences.
-- ARGV[2..6]  the request: tier asked, input tokens, output tokens, firm tokens,
--             commit_on_deny (0/1)
-- ARGV[7..13] the tenant's limits: rpm, tpm, burst, budget (-1 = none), budget_in_usd
--             (0/1), period (0 minute, 1 hour, 2 day, 3 month, 4 total), low_water
-- ARGV[14]    number of tiers n; ARGV[15..14+2n] nano-USD per input, output token per tier
-- (the request's arguments come first so the caller can keep the limits' encoding)
--
-- Reply: 17 integers, Outcome's order: kind, reason, tier, retry_after_s,
-- limit_requests, remaining_requests, reset_requests_us, limit_tokens,
-- remaining_tokens, reset_tokens_us, budget_limit, budget_remaining, budget_reset_us,
-- charged_tokens, charged_cost, period_start_us, wait_us (µs until the refusing limit
-- has room, exact: the admission queue waits by it).
--
-- TTLs: a bucket key expires when it would be full again (plus 1 s), written with its
-- level in one SET (common.lua). A budget key
-- gets a TTL to period end + 1 day once (common.lua), when a new period starts. A `total` budget
-- key has no TTL: expiring it would hand the tenant its spend back.
--
-- Numbers are doubles (Lua 5.1); µs since the epoch (~1.8e15) and nano-USD sums stay
-- below 2^53, so they are exact.

-- (common.lua, prepended at load, defines NO_END, US, DAY_US, clock_us, period_bounds,
-- bucket_level, bucket_store)

local function decide(KEYS, ARGV)

  local now = clock_us(ARGV[1])
  -- leases of this tenant past their end give back what their holders did not use first
  -- (common.lua, "Capacity leases"; the keys are named from KEYS[3]'s tag, same slot)
  sweep_leases(string.sub(KEYS[3], 1, -7), now)
  local tier, input, output = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
  local firm, commit_on_deny = tonumber(ARGV[5]), ARGV[6] == '1'
  local rpm, tpm, burst = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
  local budget, in_usd, period = tonumber(ARGV[10]), ARGV[11] == '1', tonumber(ARGV[12])
  local low_water = tonumber(ARGV[13])
  local ntiers = tonumber(ARGV[14])

  local function wait_us(deficit, rate)
    if deficit <= 0 then return 0 end
    local w = deficit / rate
    if w >= MAX_WAIT_US then return MAX_WAIT_US end
    return math.ceil(w)
  end

  local kind, reason, retry_us = 0, 0, 0
  -- 0. a count beyond MAX_TOKENS is too large for every tenant, counted as MAX_TOKENS
  if input > MAX_TOKENS or output > MAX_TOKENS then
    kind, reason = 4, 4
    if input > MAX_TOKENS then input = MAX_TOKENS end
    if output > MAX_TOKENS then output = MAX_TOKENS end
  end
  local tokens = input + output
  local req_cap, tok_cap = rpm * burst, tpm * burst
  local req_rate, tok_rate = rpm / 60e6, tpm / 60e6

  -- 1. the soft part of an estimate never makes a request impossible
  if kind == 0 and tpm > 0 and tokens > tok_cap then
    if firm > tok_cap then
      kind, reason = 4, 2
    else
      output = math.floor(tok_cap) - input
      if output < 0 then output = 0 end
      tokens = input + output
    end
  end

  -- 2. budget: period from the clock, downgrade below low water, cost at the tier it goes to
  local cost, budget_remaining, pstart, pend, spent = 0, -1, 0, NO_END, 0
  local new_period = false
  if budget >= 0 then
    pstart, pend = period_bounds(now, period)
    local b = redis.call('HMGET', KEYS[3], 'ps', 's')
    new_period = tonumber(b[1]) ~= pstart
    if not new_period then spent = stored_spend(b[2]) end
    local remaining = budget - spent
    if remaining < low_water * budget and tier + 1 < ntiers then
      tier = tier + 1
      if kind == 0 then kind = 1 end
    end
    if in_usd then
      cost = input * tonumber(ARGV[15 + 2 * tier]) + output * tonumber(ARGV[16 + 2 * tier])
    else
      cost = input + output
    end
    if cost > MAX_COST then cost = MAX_COST end
    budget_remaining = remaining
    if kind <= 1 then
      if cost > budget then
        kind, reason = 4, 3
      elseif cost > remaining then
        kind, reason = 3, 3
        if pend ~= NO_END then retry_us = pend - now end
      end
    end
  end

  -- 3. buckets, each limit its own key
  local req_level, tok_level = 0, 0
  if rpm > 0 then req_level = bucket_level(KEYS[1], req_cap, req_rate, now) end
  if tpm > 0 then tok_level = bucket_level(KEYS[2], tok_cap, tok_rate, now) end
  if kind <= 1 then
    local wait_req, wait_tok = 0, 0
    if rpm > 0 and req_level < 1 then wait_req = (1 - req_level) / req_rate end
    if tpm > 0 and tok_level < tokens then wait_tok = (tokens - tok_level) / tok_rate end
    if wait_req > 0 or wait_tok > 0 then
      kind = 2
      if wait_req >= wait_tok then reason, retry_us = 1, wait_req else reason, retry_us = 2, wait_tok end
    end
  end

  -- 4. commit: only an admitted request (or shadow mode) is charged; a denial holds nothing.
  -- The refilled levels are written either way (refill bookkeeping, as the core does).
  local charged_tokens, charged_cost = 0, 0
  local admitted = kind <= 1 or commit_on_deny
  if admitted then
    if rpm > 0 then req_level = req_level - 1 end
    if tpm > 0 then tok_level = tok_level - tokens end
    charged_tokens, charged_cost = tokens, cost
  end
  if rpm > 0 then bucket_store(KEYS[1], req_level, req_cap, req_rate, now) end
  if tpm > 0 then bucket_store(KEYS[2], tok_level, tok_cap, tok_rate, now) end
  if budget >= 0 then
    -- nothing wrote the budget key since it was read above (the script is atomic)
    if new_period or admitted then
      if admitted then spent = add_spend(spent, cost) end
      redis.call('HSET', KEYS[3], 'ps', string.format('%d', pstart), 's', string.format('%d', spent))
      if new_period and pend ~= NO_END then
        expire_after_period(KEYS[3], pend, now)
      end
    end
    -- the charge is held in the durable spend until its settlement (common.lua, held_add)
    if admitted then held_add(string.sub(KEYS[3], 1, -7), pstart, cost) end
    budget_remaining = budget - spent
  end

  local retry_after_s = 0
  if retry_us > MAX_WAIT_US then retry_us = MAX_WAIT_US end
  if retry_us > 0 then
    retry_after_s = math.ceil(retry_us / US)
    if retry_after_s < 1 then retry_after_s = 1 end
  end
  -- remaining in [0, limit]: a debt shows as 0, the burst above the limit is not promised;
  -- reset: time until remaining is back at the limit (docs/contract.md, "Headers and burst")
  local function remaining(level, limit)
    if level <= 0 then return 0 end
    if level >= limit then return limit end
    return math.floor(level)
  end
  local rem_req, reset_req, rem_tok, reset_tok = 0, 0, 0, 0
  if rpm > 0 then rem_req, reset_req = remaining(req_level, rpm), wait_us(rpm - req_level, req_rate) end
  if tpm > 0 then rem_tok, reset_tok = remaining(tok_level, tpm), wait_us(tpm - tok_level, tok_rate) end
  local b_rem, b_reset, ps_out = 0, 0, 0
  if budget >= 0 then
    b_rem = budget_remaining > 0 and budget_remaining or 0
    if pend ~= NO_END then b_reset = pend - now end
    ps_out = pstart
  end
  return {kind, reason, tier, retry_after_s, rpm, rem_req, reset_req, tpm, rem_tok, reset_tok,
          budget, b_rem, b_reset, charged_tokens, charged_cost, ps_out, math.ceil(retry_us)}
end
