-- lease.lua: a sidecar takes a lease of one tenant's capacity, atomically, and returns
-- what it did not use of its previous lease, in the same call.
--
-- A lease is capacity taken out of the shared pool at once, exactly as if that many
-- requests, tokens and budget had been charged: the request bucket and the token bucket
-- go down by it, the budget's spend goes up by it. The sidecar then decides locally, with
-- the Cython core, within what it holds (sidecar/backends/lease.py), so the fleet never
-- admits more than the pool allowed. Returning the unused part is a refund, with
-- settle.lua's rules: a bucket never refills above its capacity, and a refund never
-- reaches into a closed budget period.
--
-- Bucket refill, storage and the calendar are common.lua's (shared with decide.lua and
-- settle.lua): one implementation of each.
--
-- KEYS[1]  request bucket   kt:{tenant}:rpm   (decide.lua's KEYS)
-- KEYS[2]  token bucket     kt:{tenant}:tpm
-- KEYS[3]  budget hash      kt:{tenant}:budget
-- KEYS[4]  this call's marker  kt:{tenant}:lease-call:<call id> (ARGV[18]: its TTL, ms)
-- ARGV[1]  clock override in µs ("0" in production: the server's TIME)
-- ARGV[2..7]   rpm, tpm, burst, budget (-1 = none), period (0..4), low_water
-- ARGV[8..11]  returned: requests, tokens, cost, and the period start of the returned
--              lease's budget charge (-1: nothing returned)
-- ARGV[12..14] wanted: requests, tokens, cost
-- ARGV[15..17] at least: requests, tokens, cost. Below any of them (for a limit the tenant
--              has) nothing is granted and nothing is taken: the caller decides per request
-- ARGV[18]     how long this call's marker is kept (ms)
-- Reply: {granted requests, granted tokens, granted cost, period start, period end,
--         now (µs, the server's clock), request level after, token level after,
--         budget remaining after} (levels floored; -1 for a limit the tenant does not have)
--
-- The budget part keeps the tenant above its low-water mark: a lease never takes budget
-- that a decision would have answered with a downgrade, so a request admitted within a
-- lease is one decide.lua would have admitted at the tier it asked for.
--
-- A call is applied once: the same call sent again (same KEYS[4]) applies nothing and
-- answers what the first answered. redis-py's cluster client resends a command after a
-- connection error or a socket timeout, when the first may have been applied; a refund
-- applied twice would over-admit (a lease taken twice would only under-admit).

local done = redis.call('GET', KEYS[4])
if done then
  local first = {}
  for n in string.gmatch(done, '[^,]+') do first[#first + 1] = tonumber(n) end
  return first
end

local now = clock_us(ARGV[1])
local rpm, tpm, burst = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local budget, period, low_water = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local r_req, r_tok, r_cost, r_start = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10]),
  tonumber(ARGV[11])
local w_req, w_tok, w_cost = tonumber(ARGV[12]), tonumber(ARGV[13]), tonumber(ARGV[14])
local m_req, m_tok, m_cost = tonumber(ARGV[15]), tonumber(ARGV[16]), tonumber(ARGV[17])

local g_req, g_tok, g_cost = 0, 0, 0
local ok = true
local req_level, tok_level = -1, -1
local req_cap, req_rate, tok_cap, tok_rate
if rpm > 0 then
  req_cap, req_rate = rpm * burst, rpm / 60e6
  req_level = bucket_level(KEYS[1], req_cap, req_rate, now) + r_req
  if req_level > req_cap then req_level = req_cap end
  g_req = math.min(w_req, math.floor(req_level))
  if g_req < m_req then ok = false end
end
if tpm > 0 then
  tok_cap, tok_rate = tpm * burst, tpm / 60e6
  tok_level = bucket_level(KEYS[2], tok_cap, tok_rate, now) + r_tok
  if tok_level > tok_cap then tok_level = tok_cap end
  g_tok = math.min(w_tok, math.floor(tok_level))
  if g_tok < m_tok then ok = false end
end
local pstart, pend, spent, new_period = 0, NO_END, 0, false
if budget >= 0 then
  pstart, pend = period_bounds(now, period)
  local b = redis.call('HMGET', KEYS[3], 'ps', 's')
  new_period = tonumber(b[1]) ~= pstart
  if not new_period then spent = tonumber(b[2]) or 0 end
  if r_cost > 0 and r_start == pstart then
    spent = spent - r_cost
    if spent < 0 then spent = 0 end
  end
  -- what can be leased without crossing the low-water mark (decide.lua downgrades when
  -- the remaining budget is below low_water x budget)
  local headroom = math.floor(budget - spent - low_water * budget)
  g_cost = math.min(w_cost, headroom)
  if g_cost < m_cost then ok = false end
end
if not ok then g_req, g_tok, g_cost = 0, 0, 0 end

if rpm > 0 and (r_req > 0 or g_req > 0) then
  req_level = req_level - g_req
  bucket_store(KEYS[1], req_level, req_cap, req_rate, now)
end
if tpm > 0 and (r_tok > 0 or g_tok > 0) then
  tok_level = tok_level - g_tok
  bucket_store(KEYS[2], tok_level, tok_cap, tok_rate, now)
end
local remaining = -1
if budget >= 0 then
  spent = spent + g_cost
  remaining = budget - spent
  if r_cost > 0 or g_cost > 0 or new_period then
    redis.call('HSET', KEYS[3], 'ps', string.format('%d', pstart), 's', string.format('%d', spent))
    if new_period and pend ~= NO_END then
      expire_after_period(KEYS[3], pend, now)
    end
  end
end
local reply = {g_req, g_tok, g_cost, pstart, pend, now, math.floor(req_level),
               math.floor(tok_level), remaining}
local text = {}
for i, v in ipairs(reply) do text[i] = string.format('%d', v) end
redis.call('SET', KEYS[4], table.concat(text, ','), 'PX', ARGV[18])
return reply
