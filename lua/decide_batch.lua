-- entry: several decisions in one script call, applied in the order given, each
-- exactly as decide_one.lua would apply it (the batch is atomic as a whole).
--
-- KEYS     3 keys per decision, in order (decide.lua's KEYS[1..3] of each)
-- ARGV[1]  number of decisions n
-- then, per decision: its argument count c, then its c arguments (decide.lua's ARGV)
-- last     the callers' deadline (deadline.lua): past it, nothing is applied
-- Reply: n replies, each decide.lua's 17 integers, or an error reply for a decision
-- that failed (a key of the wrong type, say) while the others stand
--
-- Why: a script call's fixed cost in Redis (lookup, set-up, reply) is several times a
-- small decision's own; the sidecar sends what one event-loop tick queued as one call.
-- Why pcall: Redis keeps a script's writes when it fails, so without it one tenant's bad
-- key would fail the whole batch after the decisions before it were charged: tenants
-- answered by the failure mode yet billed. decide() reads every key before it writes
-- any, so a decision that fails on a key has changed nothing.
local late = expired(ARGV[#ARGV])
if late then return late end
local out = {}
local at = 2
for i = 1, tonumber(ARGV[1]) do
  local argc = tonumber(ARGV[at])
  local args = {}
  for j = 1, argc do args[j] = ARGV[at + j] end
  local ok, res = pcall(decide, {KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]}, args)
  if ok then
    out[i] = res
  else
    out[i] = redis.error_reply(type(res) == 'table' and res.err or tostring(res))
  end
  at = at + argc + 1
end
return out
