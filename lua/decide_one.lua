-- entry: one decision with this script call's KEYS and ARGV (see decide.lua)
return decide(KEYS, ARGV)
