-- lease_sweep.lua: closes one tenant's leases past their end (common.lua, "Capacity
-- leases"), without a decision. Every sidecar runs it now and then for the leases the
-- index <prefix>:lease-ends says have ended (sidecar/backends/redis/lease.py), so a lease whose
-- holder died comes back even when no request of its tenant follows.
--
-- KEYS[1]  the tenant's open leases   kt:{tenant}:leases
-- ARGV[1]  clock override in µs ("0" in production: the server's TIME)
-- ARGV[2]  a lease id
-- Reply: 1 when that lease is closed now (or was already), 0 while it is still open

local now = clock_us(ARGV[1])
sweep_leases(string.sub(KEYS[1], 1, -7), now)
if redis.call('HEXISTS', KEYS[1], ARGV[2]) == 1 then return 0 end
return 1
