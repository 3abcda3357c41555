-- entry: several path decisions in one script call, applied in the order given, each
-- exactly as decide_path_one.lua would apply it (the batch is atomic as a whole).
--
-- KEYS     each decision's keys (decide_path.lua's KEYS), one decision after another
-- ARGV[1]  number of decisions n
-- then, per decision: its key count, its argument count c, then its c arguments
-- last     the callers' deadline (deadline.lua): past it, nothing is applied
-- Reply: n replies, each decide_path.lua's, or an error reply for a decision that failed
-- while the others stand (batch.lua's loop)
local late = expired(ARGV[#ARGV])
if late then return late end
return run_batch(decide_path, nil)
