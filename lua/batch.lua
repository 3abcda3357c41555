-- batch.lua: the loop the three batch entries share (decide_batch.lua, routed_batch.lua,
-- settle_batch.lua). Not a script of its own: sidecar/backends/redis/scripts.py joins it
-- before each of them, so the framing of a batch and its per-item pcall exist once.
--
-- ARGV[1]  number of items n
-- then, per item: its key count (only when `keys_each` is nil), its argument count c,
--          then its c arguments
-- KEYS     each item's keys, one item after another (`keys_each` per item, or the count
--          sent before its arguments)
-- Reply: n replies, each `one(keys, args)`'s, or an error reply for an item that failed
-- (a key of the wrong type, say) while the others stand.
--
-- Why pcall: Redis keeps a script's writes when it fails, so without it one tenant's bad
-- key would fail the whole batch after the items before it were applied: tenants answered
-- by the failure mode yet billed. decide() reads every key before it writes any, so a
-- decision that fails on a key has changed nothing.

local function run_batch(one, keys_each)
  local out = {}
  local at, kat = 2, 0
  for i = 1, tonumber(ARGV[1]) do
    local nkeys = keys_each
    if nkeys == nil then
      nkeys = tonumber(ARGV[at])
      at = at + 1
    end
    local argc = tonumber(ARGV[at])
    local keys, args = {}, {}
    for j = 1, nkeys do keys[j] = KEYS[kat + j] end
    for j = 1, argc do args[j] = ARGV[at + j] end
    local ok, res = pcall(one, keys, args)
    if ok then
      out[i] = res
    else
      out[i] = redis.error_reply(type(res) == 'table' and res.err or tostring(res))
    end
    at = at + argc + 1
    kat = kat + nkeys
  end
  return out
end
