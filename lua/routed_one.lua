-- entry: one routed decision with this script call's KEYS and ARGV (see routed.lua), its
-- deadline after them (the last ARGV, see deadline.lua)
local late = expired(ARGV[#ARGV])
if late then return late end
return routed(KEYS, ARGV)
