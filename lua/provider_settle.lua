-- provider_settle.lua: correct a provider's buckets, once per marker. Mirrors quota_settle()
-- in native/core.pyx: a settlement's token difference (actual minus charged; negative gives
-- back), and the requests a refund gives back (a cluster decision whose tenant step refused).
--
-- KEYS[1..3]  the provider's rpm, tpm, rpd keys (provider.lua)
-- KEYS[4]     marker for this correction (kt:prov:{<id>}:settled:<request id>)
-- ARGV[1]     clock override in µs ("0": the server's TIME)
-- ARGV[2..3]  delta tokens, delta requests
-- ARGV[4..10] the quota (provider.lua)
-- ARGV[11]    marker TTL in ms
-- Reply: 1 applied, 0 this marker was applied before

-- (common.lua and provider.lua are joined before this file at load)
if not redis.call('SET', KEYS[4], '1', 'NX', 'PX', tonumber(ARGV[11])) then return 0 end
local now = clock_us(ARGV[1])
quota_settle(KEYS, quota_of(ARGV, 4), now, tonumber(ARGV[2]), tonumber(ARGV[3]))
return 1
