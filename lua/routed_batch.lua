-- entry: several routed decisions in one script call, applied in the order given, each
-- exactly as routed_one.lua would apply it (the batch is atomic as a whole).
--
-- KEYS     each decision's keys (routed.lua's KEYS), one decision after another
-- ARGV[1]  number of decisions n
-- then, per decision: its key count, its argument count c, then its c arguments
-- last     the callers' deadline (deadline.lua): past it, nothing is applied
-- Reply: n replies, each routed.lua's 20 integers, or an error reply for a decision that
-- failed while the others stand (pcall: see decide_batch.lua for why)
local late = expired(ARGV[#ARGV])
if late then return late end
local out = {}
local at, kat = 2, 0
for i = 1, tonumber(ARGV[1]) do
  local nkeys, argc = tonumber(ARGV[at]), tonumber(ARGV[at + 1])
  local keys, args = {}, {}
  for j = 1, nkeys do keys[j] = KEYS[kat + j] end
  for j = 1, argc do args[j] = ARGV[at + 1 + j] end
  local ok, res = pcall(routed, keys, args)
  if ok then
    out[i] = res
  else
    out[i] = redis.error_reply(type(res) == 'table' and res.err or tostring(res))
  end
  at = at + argc + 2
  kat = kat + nkeys
end
return out
