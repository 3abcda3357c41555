-- entry: one path decision with this script call's KEYS and ARGV (see decide_path.lua),
-- its deadline after them (the last ARGV, see deadline.lua)
local late = expired(ARGV[#ARGV])
if late then return late end
return decide_path(KEYS, ARGV)
