-- cell.lua: how a cell of a holder tree is stored (decide_path.lua, settle_path.lua;
-- docs/budgets.md). Not a script of its own: scripts.py joins it after common.lua.
--
-- A cell is ONE string key under the tree's root hash tag: six little-endian doubles
-- (struct.pack '<dddddd', 48 bytes): request level, its last update (µs), token level, its
-- last update, budget period start (µs; -1: none yet), spent. Every value is an integer
-- below 2^53 or a level, so doubles hold them exactly. A path of n cells is read by one
-- MGET and written by one SET per cell, where the flat keys (decide.lua) take a read and
-- a write per bucket and budget; packing instead of text saves ~4 µs of Valkey CPU per
-- cell (parsing six numbers out of text is dearer than a Redis call), so a three-level
-- decision stays near a one-level one (bench/holders_cost.py).
--
-- TTL, set with every write: the longest of "its buckets full again, plus 1 s" (as a
-- bucket key's) and "a day after its budget period ends" (as a budget key's); a cell with
-- a `total` budget has none (expiring it would hand its spend back). A missing key is a
-- fresh cell (buckets full, nothing spent), which is exactly its state by its expiry.

-- the stored fields of a cell, or nil (absent, or unreadable: a fresh cell)
local function cell_read(v)
  if type(v) ~= 'string' or #v ~= 48 then return nil end
  local r = {struct.unpack('<dddddd', v)}
  for i = 1, 6 do
    local x = r[i]
    if x ~= x or x == math.huge or x == -math.huge then return nil end
  end
  return r
end

-- period_bounds (common.lua), remembered for the script call's clock: the cells of a path
-- (and the decisions of a batch, which share one clock) mostly share a few periods, and a
-- month's bounds take ~2 µs of calendar arithmetic
local bounds_now, bounds = nil, {}
local function cell_period(now, p)
  if bounds_now ~= now then bounds_now, bounds = now, {} end
  local b = bounds[p]
  if b == nil then
    local s, e = period_bounds(now, p)
    b = {s, e}
    bounds[p] = b
  end
  return b[1], b[2]
end

-- a cell's budget period: from the clock, or (period 6) the window the sidecar computed
-- (a time zone, an anchor: docs/budgets.md) and, from its end on, the next one, so a
-- Valkey clock a little ahead of the sidecar's rolls over exactly at the window's end;
-- the next one too once the cell (its stored period start) is in it: a window never goes
-- back, so a sidecar whose clock is behind another's does not restart its spend from zero
local function cell_bounds(now, c, stored)
  if c.period ~= 6 then return cell_period(now, c.period) end
  if now < c.we and stored ~= c.we then return c.ws, c.we end
  return c.we, c.wn
end

-- a bucket's level now (bucket_level's rule, common.lua): refilled since `last`, never
-- above `cap`; a cell never stored reads full
local function cell_level(r, i, cap, rate, now)
  if r == nil then return cap end
  local level = r[i]
  local elapsed = now - r[i + 1]
  if elapsed > 0 then level = level + elapsed * rate end
  if level > cap then return cap end
  return level
end

-- writes a cell: s = {req level, req last, tok level, tok last, period start, spent};
-- c its limits (rpm, tpm, req_cap, tok_cap, req_rate, tok_rate, budget, pe: its period end)
-- keep_ttl: the TTL already set is still right (a budget alone, in the period that set it)
local function cell_write(key, s, c, now, keep_ttl)
  local v = struct.pack('<dddddd', s[1], s[2], s[3], s[4], s[5], s[6])
  if c.budget >= 0 and c.pe == NO_END then
    redis.call('SET', key, v)  -- a total budget: kept (SET also drops any earlier TTL)
    return
  end
  if keep_ttl then
    redis.call('SET', key, v, 'KEEPTTL')
    return
  end
  local ms = 1000
  if c.rpm > 0 and c.req_cap - s[1] > 0 then
    ms = math.max(ms, 1000 + math.ceil((c.req_cap - s[1]) / c.req_rate / 1000))
  end
  if c.tpm > 0 and c.tok_cap - s[3] > 0 then
    ms = math.max(ms, 1000 + math.ceil((c.tok_cap - s[3]) / c.tok_rate / 1000))
  end
  if c.budget >= 0 then ms = math.max(ms, math.floor((c.pe + DAY_US - now) / 1000)) end
  redis.call('SET', key, v, 'PX', ms)
end
