-- common.lua: the calendar and the bucket storage shared by decide.lua and settle.lua.
-- Not a script of its own: sidecar/backends/redis/scripts.py prepends it to each script before
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
  if p == 5 then  -- week from Monday 00:00 UTC (1970-01-01 was a Thursday)
    local days = (t - math.fmod(t, DAY_US)) / DAY_US
    days = days - math.fmod(days + 3, 7)
    return days * DAY_US, (days + 7) * DAY_US
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

-- The held part of the durable spend (issue 22; docs/ledger.md, "Held"): what a tenant's
-- budget holds for requests not settled yet and for capacity leased and not returned, per
-- budget period, in the budget's unit. One field of the tenant's spend hash
-- (<prefix>:{tenant}:spend, ledger_spend.lua), "h|<period start µs>", moved by every
-- script that moves the budget on their account, in the same atomic call: a decision's
-- charge adds (decide.lua), its refund (routed.lua), a lease taken or given back
-- (lease.lua, lease_adjust below) and a settlement (settle.lua: the estimate leaves,
-- the usage goes to the settled cells) move it back. So at any instant the budget of a
-- period holds exactly the settled spend charged in it plus this. A field back at zero
-- is deleted (a minute budget must not leave a field a minute).
local HELD_TTL_MS = 400 * 86400 * 1000  -- ledger_spend.lua's: the hash outlives its holds

local function held_add(tag, ps, amount)
  if amount == 0 then return end
  local key, field = tag .. 'spend', 'h|' .. string.format('%d', ps)
  local v = redis.call('HINCRBY', key, field, string.format('%d', amount))
  if v == 0 then
    redis.call('HDEL', key, field)
  elseif v == amount then  -- a new field: the hash lives at least as long as a spend write
    redis.call('PEXPIRE', key, HELD_TTL_MS)
  end
end

-- Capacity leases (lua/lease.lua, sidecar/backends/redis/lease.py). A tenant's open leases are
-- one hash, <prefix>:{tenant}:leases (field: lease id, value: its record), in the
-- tenant's slot; the other keys are named from the same tag ("<prefix>:{tenant}:"), so
-- any script call on a tenant can find them. A record: end (µs, this node's clock), the
-- period start of its budget charge, the limits it was taken under (rpm, tpm, burst,
-- budget, period), what it took (requests, tokens, cost) and what its holder reported
-- used of it so far (the same three). No TTL: the hash goes when its last lease closes.
--
-- A lease closes once: returned by its holder (lease.lua), or swept by the first script
-- call on the tenant (decide, settle, lease) at or after its end, whether its holder is
-- alive or not. Closing gives what was not used back to the pool (settle.lua's refund
-- rules) and replaces the record by <prefix>:{tenant}:lease-closed:<id> (the record, the
-- used amounts it closed with, and whether its cost went back), kept LEASE_CLOSED_MS: a
-- report or return that arrives after a sweep charges only what it adds to what the sweep
-- counted as used, and one that arrives twice adds nothing. So the pool gets back exactly
-- what was not used, once.
local LEASE_CLOSED_MS = 600000

local function lease_record(text)
  local r = {}
  for n in string.gmatch(text, '[^ ]+') do r[#r + 1] = tonumber(n) end
  return r
end

local function lease_record_text(r)
  local t = {}
  for i, v in ipairs(r) do t[i] = string.format('%.17g', v) end
  return table.concat(t, ' ')
end

-- gives back to the pool (amounts > 0) or charges it (< 0) on behalf of a lease: a bucket
-- never refills above its capacity, and cost moves only within the lease's own budget
-- period (a closed period's spend is history). True when the cost moved.
local function lease_adjust(tag, r, d_req, d_tok, d_cost, now)
  local rpm, tpm, burst, budget, period, ps = r[3], r[4], r[5], r[6], r[7], r[2]
  if rpm > 0 and d_req ~= 0 then
    local cap, rate = rpm * burst, rpm / 60e6
    local level = bucket_level(tag .. 'rpm', cap, rate, now) + d_req
    if level > cap then level = cap end
    bucket_store(tag .. 'rpm', level, cap, rate, now)
  end
  if tpm > 0 and d_tok ~= 0 then
    local cap, rate = tpm * burst, tpm / 60e6
    local level = bucket_level(tag .. 'tpm', cap, rate, now) + d_tok
    if level > cap then level = cap end
    bucket_store(tag .. 'tpm', level, cap, rate, now)
  end
  if budget < 0 or d_cost == 0 then return false end
  local b = redis.call('HMGET', tag .. 'budget', 'ps', 's')
  if tonumber(b[1]) ~= ps or period_bounds(now, period) ~= ps then return false end
  redis.call('HSET', tag .. 'budget', 's', string.format('%d', add_spend(stored_spend(b[2]), -d_cost)))
  held_add(tag, ps, -d_cost)
  return true
end

-- closes an open lease whose holder used (at least) u_req, u_tok, u_cost of it
local function lease_close(tag, id, r, u_req, u_tok, u_cost, now)
  local moved = lease_adjust(tag, r, r[8] - u_req, r[9] - u_tok, r[10] - u_cost, now)
  r[11], r[12], r[13], r[14] = u_req, u_tok, u_cost, moved and 1 or 0
  redis.call('HDEL', tag .. 'leases', id)
  redis.call('SET', tag .. 'lease-closed:' .. id, lease_record_text(r), 'PX', LEASE_CLOSED_MS)
end

-- every lease of the tenant past its end closes with what its holder had reported used
local function sweep_leases(tag, now)
  local open = redis.call('HGETALL', tag .. 'leases')
  for i = 1, #open, 2 do
    local r = lease_record(open[i + 1])
    if now >= r[1] then lease_close(tag, open[i], r, r[11], r[12], r[13], now) end
  end
end
