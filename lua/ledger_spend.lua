-- ledger_spend.lua: spend per tenant, UTC day and model, kept where the budget lives
-- (issue 15), by the same script call that corrects the budget (settle.lua) or keeps a
-- reservation's estimate charged (record_spend.lua). Joined after common.lua at load.
--
-- One hash per tenant, kt:{tenant}:spend (the tenant's slot in a cluster). Fields
-- "<day>|<kind>|<model>": day = whole UTC days since the epoch by Redis's clock; kind:
-- n (requests), i, o (input, output tokens), cr, cw (cache read, cache write tokens),
-- c (cost, nano-USD). The model goes last: it may hold any character. Counts arrive as
-- ARGV strings and go to HINCRBY as they are: exact 64-bit integers, no Lua doubles.

local SPEND_TTL_MS = 400 * 86400 * 1000  -- a tenant idle for 400 days forgets its spend

local function spend_add(key, now, model, n, i, o, cr, cw, c)
  local p = string.format('%d', (now - math.fmod(now, DAY_US)) / DAY_US) .. '|'
  local counts = {n = n, i = i, o = o, cr = cr, cw = cw, c = c}
  for kind, v in pairs(counts) do
    if v ~= '0' then redis.call('HINCRBY', key, p .. kind .. '|' .. model, v) end
  end
  redis.call('PEXPIRE', key, SPEND_TTL_MS)
end
