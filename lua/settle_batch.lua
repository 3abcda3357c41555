-- entry: several settlements in one script call, applied in the order given, each
-- exactly as settle.lua applies it: settle.lua's own text is the body of settle_one()
-- (sidecar/backends/settle_batch.py wraps it at load), so the rule exists once.
--
-- KEYS     4 keys per settlement, in order (settle.lua's KEYS[1..4] of each)
-- ARGV[1]  number of settlements n
-- then, per settlement: its argument count c, then its c arguments (settle.lua's ARGV)
-- Reply: n replies, each settle.lua's {applied, budget spent}, or an error reply for a
-- settlement that failed (a key of the wrong type, say) while the others stand
--
-- Why: usage comes back in batches (Envoy's access log sends many entries a message), and
-- a script call's fixed cost in Redis is several times a small settlement's own.
local out = {}
local at = 2
for i = 1, tonumber(ARGV[1]) do
  local argc = tonumber(ARGV[at])
  local args = {}
  for j = 1, argc do args[j] = ARGV[at + j] end
  local ok, res = pcall(settle_one, {KEYS[4 * i - 3], KEYS[4 * i - 2], KEYS[4 * i - 1],
                                     KEYS[4 * i]}, args)
  if ok then
    out[i] = res
  else
    out[i] = redis.error_reply(type(res) == 'table' and res.err or tostring(res))
  end
  at = at + argc + 1
end
return out
