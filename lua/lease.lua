-- lease.lua: a sidecar takes a lease of one tenant's capacity, atomically, and reports
-- what it used of the lease it holds (returning what is left, when it closes it), in the
-- same call.
--
-- A lease is capacity taken out of the shared pool at once, exactly as if that many
-- requests, tokens and budget had been charged: the request bucket and the token bucket
-- go down by it, the budget's spend goes up by it. The sidecar then decides locally, with
-- the Cython core, within what it holds (sidecar/backends/redis/lease.py), so the fleet never
-- admits more than the pool allowed. Each lease is recorded in the tenant's slot with its
-- end on this node's clock (common.lua, "Capacity leases"): what its holder does not
-- return by then is given back by the first script call on the tenant after it (decide,
-- settle, or this one), counting as used what the holder last reported. A refund follows
-- settle.lua's rules: a bucket never refills above its capacity, and a refund never
-- reaches into a closed budget period.
--
-- Bucket refill, storage, the calendar and the lease records are common.lua's (shared
-- with decide.lua and settle.lua): one implementation of each.
--
-- KEYS[1]  request bucket   kt:{tenant}:rpm   (decide.lua's KEYS)
-- KEYS[2]  token bucket     kt:{tenant}:tpm
-- KEYS[3]  budget hash      kt:{tenant}:budget
-- KEYS[4]  this call's marker  kt:{tenant}:lease-call:<call id> (ARGV[21]: its TTL, ms)
-- KEYS[5]  the tenant's open leases  kt:{tenant}:leases (closed ones:
--          kt:{tenant}:lease-closed:<id>, named from the same tag)
-- ARGV[1]  clock override in µs ("0" in production: the server's TIME)
-- ARGV[2..7]   rpm, tpm, burst, budget (-1 = none), period (0..4), low_water
-- ARGV[8]      the lease the caller holds ("" none); ARGV[9..11] what it used of it so far:
--              requests, tokens, cost; ARGV[12] 1: it is returned (closed), 0: a report
-- ARGV[13..15] wanted: requests, tokens, cost
-- ARGV[16..18] at least: requests, tokens, cost. Below any of them (for a limit the tenant
--              has) nothing is granted and nothing is taken: the caller decides per request
-- ARGV[19]     the new lease's id; ARGV[20] how long it lasts (µs): any call after that
--              may close it
-- ARGV[21]     how long this call's marker is kept (ms)
-- Reply: {granted requests, granted tokens, granted cost, period start, period end,
--         now (µs, the server's clock), request level after, token level after,
--         budget remaining after} (levels floored; -1 for a limit the tenant does not have)
--
-- The budget part keeps the tenant above its low-water mark: a lease never takes budget
-- that a decision would have answered with a downgrade, so a request admitted within a
-- lease is one decide.lua would have admitted at the tier it asked for.
--
-- Used amounts are totals since the lease was taken: a report counts as used the larger of
-- it and the last one (never more than was taken); a return or report that finds its lease
-- already closed (swept after its end, or returned) charges what it adds to the used
-- amounts it closed with, so whatever the order of a return and a sweep the pool ends with
-- exactly what the holder used.
-- A call that takes a lease is applied once: the same call sent again (same KEYS[4])
-- applies nothing and answers what the first answered. redis-py's cluster client resends
-- a command after a connection error or a socket timeout, when the first may have been
-- applied; a lease taken twice would hold capacity no one uses until its end. A report or
-- a return that takes nothing keeps no marker: applied twice, it adds nothing (above).

local done = redis.call('GET', KEYS[4])
if done then
  local first = {}
  for n in string.gmatch(done, '[^,]+') do first[#first + 1] = tonumber(n) end
  return first
end

local now = clock_us(ARGV[1])
local tag = string.sub(KEYS[5], 1, -7)
sweep_leases(tag, now)

local rpm, tpm, burst = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local budget, period, low_water = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local held = ARGV[8]
local u_req, u_tok, u_cost = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
local w_req, w_tok, w_cost = tonumber(ARGV[13]), tonumber(ARGV[14]), tonumber(ARGV[15])
local m_req, m_tok, m_cost = tonumber(ARGV[16]), tonumber(ARGV[17]), tonumber(ARGV[18])

-- what the holder used of its lease: within [last reported, taken]
local function used_within(r, a, b, c)
  return math.min(r[8], math.max(r[11], a)), math.min(r[9], math.max(r[12], b)),
         math.min(r[10], math.max(r[13], c))
end

if held ~= '' then
  local open = redis.call('HGET', KEYS[5], held)
  if open then
    local r = lease_record(open)
    local a, b, c = used_within(r, u_req, u_tok, u_cost)
    if ARGV[12] == '1' then
      lease_close(tag, held, r, a, b, c, now)
    else
      r[11], r[12], r[13] = a, b, c
      redis.call('HSET', KEYS[5], held, lease_record_text(r))
    end
  else
    local closed_key = tag .. 'lease-closed:' .. held
    local closed = redis.call('GET', closed_key)
    if closed then
      -- closed already: charge what this adds to the use it was closed with
      local r = lease_record(closed)
      local a, b, c = used_within(r, u_req, u_tok, u_cost)
      local d_cost = 0
      if r[14] == 1 then d_cost = c - r[13] end  -- its cost went back: the used part returns
      lease_adjust(tag, r, r[11] - a, r[12] - b, -d_cost, now)
      r[11], r[12], r[13] = a, b, c
      redis.call('SET', closed_key, lease_record_text(r), 'KEEPTTL')
    end
  end
end

local g_req, g_tok, g_cost = 0, 0, 0
local ok = true
local req_level, tok_level = -1, -1
local req_cap, req_rate, tok_cap, tok_rate
if rpm > 0 then
  req_cap, req_rate = rpm * burst, rpm / 60e6
  req_level = bucket_level(KEYS[1], req_cap, req_rate, now)
  g_req = math.min(w_req, math.floor(req_level))
  if g_req < m_req then ok = false end
end
if tpm > 0 then
  tok_cap, tok_rate = tpm * burst, tpm / 60e6
  tok_level = bucket_level(KEYS[2], tok_cap, tok_rate, now)
  g_tok = math.min(w_tok, math.floor(tok_level))
  if g_tok < m_tok then ok = false end
end
local pstart, pend, spent, new_period = 0, NO_END, 0, false
if budget >= 0 then
  pstart, pend = period_bounds(now, period)
  local b = redis.call('HMGET', KEYS[3], 'ps', 's')
  new_period = tonumber(b[1]) ~= pstart
  if not new_period then spent = stored_spend(b[2]) end
  -- what can be leased without crossing the low-water mark (decide.lua downgrades when
  -- the remaining budget is below low_water x budget)
  local headroom = math.floor(budget - spent - low_water * budget)
  g_cost = math.min(w_cost, headroom)
  if g_cost < m_cost then ok = false end
end
if not ok then g_req, g_tok, g_cost = 0, 0, 0 end

if g_req > 0 then
  req_level = req_level - g_req
  bucket_store(KEYS[1], req_level, req_cap, req_rate, now)
end
if g_tok > 0 then
  tok_level = tok_level - g_tok
  bucket_store(KEYS[2], tok_level, tok_cap, tok_rate, now)
end
local remaining = -1
if budget >= 0 then
  spent = spent + g_cost
  remaining = budget - spent
  if g_cost > 0 or new_period then
    redis.call('HSET', KEYS[3], 'ps', string.format('%d', pstart), 's', string.format('%d', spent))
    if new_period and pend ~= NO_END then
      expire_after_period(KEYS[3], pend, now)
    end
  end
  -- held in the durable spend until used and settled, or given back (common.lua)
  held_add(tag, pstart, g_cost)
end
if g_req > 0 or g_tok > 0 or g_cost > 0 then
  redis.call('HSET', KEYS[5], ARGV[19], lease_record_text({
    now + tonumber(ARGV[20]), pstart, rpm, tpm, burst, budget, period,
    g_req, g_tok, g_cost, 0, 0, 0}))
end
local reply = {g_req, g_tok, g_cost, pstart, pend, now, math.floor(req_level),
               math.floor(tok_level), remaining}
local text = {}
for i, v in ipairs(reply) do text[i] = string.format('%d', v) end
if w_req > 0 or w_tok > 0 or w_cost > 0 then
  redis.call('SET', KEYS[4], table.concat(text, ','), 'PX', ARGV[21])
end
return reply
