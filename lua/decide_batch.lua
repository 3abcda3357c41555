-- entry: several decisions in one script call, applied in the order given, each
-- exactly as decide_one.lua would apply it (the batch is atomic as a whole).
--
-- KEYS     3 keys per decision, in order (decide.lua's KEYS[1..3] of each)
-- ARGV[1]  number of decisions n
-- then, per decision: its argument count c, then its c arguments (decide.lua's ARGV)
-- last     the callers' deadline (deadline.lua): past it, nothing is applied
-- Reply: n replies, each decide.lua's 17 integers, or an error reply for a decision
-- that failed while the others stand (batch.lua's loop, and why it uses pcall)
--
-- Why: a script call's fixed cost in Redis (lookup, set-up, reply) is several times a
-- small decision's own; the sidecar sends what one event-loop tick queued as one call.
local late = expired(ARGV[#ARGV])
if late then return late end
return run_batch(decide, 3)
