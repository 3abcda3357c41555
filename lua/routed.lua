-- routed.lua: one decision that charges a tenant and one provider together, or neither
-- (docs/providers.md). Mirrors decide_routed() in native/core.pyx step for step; one
-- atomic script call on one node (a cluster decides in two steps instead: redis.py).
--
-- KEYS[1..3]   the tenant's (decide.lua's KEYS)
-- KEYS[4..]    3 per candidate provider, in ARGV's candidate order (provider.lua)
-- ARGV[1..m]   decide.lua's ARGV, m = 14 + 2 x its number of tiers
-- ARGV[m+1]    priority (0 low, 1 normal, 2 high); ARGV[m+2] spill (tiers it may go down)
-- ARGV[m+3]    number of candidates c; then per candidate 8 values: its tier and its
--              quota (provider.lua: rpm, tpm, rpd, burst, floor low, normal, high)
-- Reply: 20 integers: decide.lua's 17, then the candidate charged (0-based, -1 none) and
-- its remaining requests and tokens after the charge (-1: no such limit or no provider)
--
-- The tenant decides first (decide()); on a provider refusal its charge is given back by
-- the exact inverse of decide()'s commit on the stored values (as core.pyx's _uncharge),
-- inside this same atomic call, so nothing else ever sees it.

-- (common.lua, provider.lua and decide.lua are joined before this file at load)

local R_PROVIDER = 5  -- Outcome reason: a provider's quota (core.pyx R_PROVIDER)

local function routed(KEYS, ARGV)
  local ntiers = tonumber(ARGV[14])
  local m = 14 + 2 * ntiers
  local prio, spill, ncand = tonumber(ARGV[m + 1]), tonumber(ARGV[m + 2]), tonumber(ARGV[m + 3])
  local now = clock_us(ARGV[1])
  local tier = tonumber(ARGV[2])
  local commit_on_deny = ARGV[6] == '1'
  local rpm, tpm, burst = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
  local budget = tonumber(ARGV[10])
  local req_cap, tok_cap = rpm * burst, tpm * burst
  local req_rate, tok_rate = rpm / 60e6, tpm / 60e6
  local tkeys = {KEYS[1], KEYS[2], KEYS[3]}
  local targs = {}
  for i = 1, m do targs[i] = ARGV[i] end

  local cands = {}
  for i = 1, ncand do
    local at = m + 4 + (i - 1) * 8
    cands[i] = {tier = tonumber(ARGV[at]), q = quota_of(ARGV, at + 1),
                keys = {KEYS[3 + 3 * i - 2], KEYS[3 + 3 * i - 1], KEYS[3 + 3 * i]}}
  end

  local function decide_at(asked)
    targs[2] = string.format('%d', asked)
    return decide(tkeys, targs)
  end
  -- the exact inverse of decide()'s commit, at the same instant (core.pyx _uncharge)
  local function uncharge(o)
    if rpm > 0 then
      local l = bucket_level(KEYS[1], req_cap, req_rate, now) + 1
      if l > req_cap then l = req_cap end
      bucket_store(KEYS[1], l, req_cap, req_rate, now)
    end
    if tpm > 0 then
      local l = bucket_level(KEYS[2], tok_cap, tok_rate, now) + o[14]
      if l > tok_cap then l = tok_cap end
      bucket_store(KEYS[2], l, tok_cap, tok_rate, now)
    end
    if budget >= 0 and o[15] ~= 0 then
      local s = tonumber(redis.call('HGET', KEYS[3], 's')) or 0
      redis.call('HSET', KEYS[3], 's', string.format('%d', s - o[15]))
      held_add(string.sub(KEYS[3], 1, -7), o[16], -o[15])
    end
  end
  local function with_provider(o, i, left, q)
    o[18] = i - 1
    o[19] = q.rpm > 0 and floor0(left.req) or -1
    o[20] = q.tpm > 0 and floor0(left.tok) or -1
    return o
  end
  local function seconds(us)
    if us <= 0 then return 0 end
    local s = math.ceil(us / US)
    if s < 1 then s = 1 end
    return s
  end

  local o = decide_at(tier)
  local charged = o[1] <= 1 or commit_on_deny
  if not charged then
    o[18], o[19], o[20] = -1, -1, -1
    return o
  end
  local t0 = o[3]
  local best, first = -1, -1
  for k = 0, spill do
    local t = t0 + k
    if t >= ntiers then break end
    local stop = false
    if k > 0 then
      uncharge(o)
      charged = false
      local d = decide_at(tier + k)
      if not (d[1] <= 1 or commit_on_deny) then
        stop = true
      else
        o, charged = d, true
        if o[3] ~= t then stop = true end
      end
    end
    if stop then break end
    for i = 1, ncand do
      local c = cands[i]
      if c.tier == t then
        if first < 0 then first = i end
        local w, r = quota_wait(c.keys, c.q, now, prio, o[14])
        if w == 0 then
          local left = quota_charge(c.keys, c.q, now, o[14], r)
          if t > tier and o[1] == 0 then o[1] = 1 end
          if k > 0 and o[1] <= 1 then o[2] = R_PROVIDER end
          return with_provider(o, i, left, c.q)
        end
        if w > 0 and (best < 0 or w < best) then best = w end
      end
    end
  end
  if charged then uncharge(o) end
  if commit_on_deny and first >= 0 then
    -- shadow: the request goes on all the same, to its tier's first candidate
    o = decide_at(tier)
    local c = cands[first]
    local _, r = quota_wait(c.keys, c.q, now, prio, o[14])
    local left = quota_charge(c.keys, c.q, now, o[14], r)
    if o[1] <= 1 then
      if best >= 0 then o[1], o[2] = 2, R_PROVIDER else o[1], o[2] = 4, R_PROVIDER end
      o[17] = best > 0 and math.ceil(best) or 0
      o[4] = seconds(best)
    end
    return with_provider(o, first, left, c.q)
  end
  local kind = best >= 0 and 2 or 4
  return {kind, R_PROVIDER, t0, seconds(best), 0, 0, 0, 0, 0, 0, -1, 0, 0, 0, 0, 0,
          best > 0 and math.ceil(best) or 0, -1, -1, -1}
end
