-- provider.lua: a provider's quota (docs/providers.md), shared by routed.lua,
-- provider_take.lua and provider_settle.lua. Not a script of its own:
-- sidecar/backends/redis/scripts.py joins common.lua, this file and an entry file at load. Mirrors
-- Quota / _quota_wait / _quota_charge / quota_settle in native/core.pyx rule for rule,
-- with the same arithmetic in the same order (tests/core/test_providers_redis.py holds both
-- to tests/core/reference_model.py).
--
-- A quota is 7 arguments: rpm, tpm, rpd (0 = no such limit), burst (0 < burst <= 1),
-- and the floors of priorities low, normal, high (the share of each bucket a request of
-- that priority must leave). Its keys, in this order:
--   rpm  "<level> <last µs>" (common.lua)        kt:prov:{<id>}:rpm
--   tpm  the same form                           kt:prov:{<id>}:tpm
--   rpd  "<day start µs> <requests that day>"    kt:prov:{<id>}:rpd
-- A missing bucket is full (as a tenant's); a missing or unreadable day count is 0.

local function quota_of(args, at)
  local q = {rpm = tonumber(args[at]), tpm = tonumber(args[at + 1]),
             rpd = tonumber(args[at + 2]), burst = tonumber(args[at + 3]),
             floors = {tonumber(args[at + 4]), tonumber(args[at + 5]), tonumber(args[at + 6])}}
  q.req_cap, q.tok_cap = q.rpm * q.burst, q.tpm * q.burst
  q.req_rate, q.tok_rate = q.rpm / 60e6, q.tpm / 60e6
  return q
end

local function day_count(key, start)
  local v = redis.pcall('GET', key)
  if type(v) ~= 'string' then return 0 end
  local sp = string.find(v, ' ', 1, true)
  if sp == nil then return 0 end
  local ds, n = tonumber(string.sub(v, 1, sp - 1)), tonumber(string.sub(v, sp + 1))
  if ds ~= start or n == nil then return 0 end
  return n
end

-- µs until q has room for one request of `tokens` at priority `prio` (0 low .. 2 high):
-- 0 now, -1 never; and the levels read at `now` (nothing is written)
local function quota_wait(keys, q, now, prio, tokens)
  local f = q.floors[prio + 1]
  local wait, never = 0, false
  local r = {req = 0, tok = 0, day = 0, day_start = 0}
  if q.rpm > 0 then
    r.req = bucket_level(keys[1], q.req_cap, q.req_rate, now)
    local need = 1 + f * q.req_cap
    if need > q.req_cap then never = true
    elseif r.req < need then
      local w = (need - r.req) / q.req_rate
      if w > wait then wait = w end
    end
  end
  if q.tpm > 0 then
    r.tok = bucket_level(keys[2], q.tok_cap, q.tok_rate, now)
    local need = tokens + f * q.tok_cap
    if need > q.tok_cap then never = true
    elseif r.tok < need then
      local w = (need - r.tok) / q.tok_rate
      if w > wait then wait = w end
    end
  end
  if q.rpd > 0 then
    local start, stop = period_bounds(now, 2)
    r.day_start, r.day_end = start, stop
    r.day = day_count(keys[3], start)
    if 1 > q.rpd * (1 - f) then never = true
    elseif r.day + 1 > q.rpd * (1 - f) then
      local w = stop - now
      if w > wait then wait = w end
    end
  end
  if never then return -1, r end
  return wait, r
end

local function day_store(key, start, stop, n, now)
  -- kept a day past its own: a count read after its day is 0 anyway
  redis.call('SET', key, string.format('%d %d', start, n), 'PX',
             math.ceil((stop - now) / 1000) + 86400000)
end

-- charge one request of `tokens`, from the levels quota_wait read at `now`
local function quota_charge(keys, q, now, tokens, r)
  if q.rpm > 0 then bucket_store(keys[1], r.req - 1, q.req_cap, q.req_rate, now) end
  if q.tpm > 0 then bucket_store(keys[2], r.tok - tokens, q.tok_cap, q.tok_rate, now) end
  if q.rpd > 0 then day_store(keys[3], r.day_start, r.day_end, r.day + 1, now) end
  return {req = r.req - 1, tok = r.tok - tokens}
end

-- remaining after a charge, as the core reports it: whole units, never below 0
local function floor0(x) if x > 0 then return math.floor(x) end return 0 end

-- a settlement's token difference (actual minus charged) and requests given back by a
-- refund (delta_requests < 0): never above capacity, the day's count never below 0
local function quota_settle(keys, q, now, d_tokens, d_requests)
  if q.tpm > 0 and d_tokens ~= 0 then
    local level = bucket_level(keys[2], q.tok_cap, q.tok_rate, now) - d_tokens
    if level > q.tok_cap then level = q.tok_cap end
    bucket_store(keys[2], level, q.tok_cap, q.tok_rate, now)
  end
  if d_requests ~= 0 then
    if q.rpm > 0 then
      local level = bucket_level(keys[1], q.req_cap, q.req_rate, now) - d_requests
      if level > q.req_cap then level = q.req_cap end
      bucket_store(keys[1], level, q.req_cap, q.req_rate, now)
    end
    if q.rpd > 0 then
      -- only the current day's count is given back; a count of another day reads as 0
      local start, stop = period_bounds(now, 2)
      local n = day_count(keys[3], start)
      if n > 0 then
        n = n + d_requests
        if n < 0 then n = 0 end
        day_store(keys[3], start, stop, n, now)
      end
    end
  end
end
