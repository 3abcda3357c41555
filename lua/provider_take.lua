-- provider_take.lua: check and charge one provider alone, atomically: the first step of a
-- decision on Redis Cluster, where a tenant's keys and a provider's keys live in different
-- slots (docs/providers.md). Mirrors quota_take() in native/core.pyx.
--
-- KEYS[1..3]  the provider's rpm, tpm, rpd keys (provider.lua)
-- ARGV[1]     clock override in µs ("0": the server's TIME)
-- ARGV[2..3]  priority (0 low, 1 normal, 2 high), tokens
-- ARGV[4..10] the quota (provider.lua)
-- Reply: {0 charged | µs until it has room | -1 never, remaining requests, remaining tokens}

-- (common.lua and provider.lua are joined before this file at load)
local now = clock_us(ARGV[1])
local prio, tokens = tonumber(ARGV[2]), tonumber(ARGV[3])
local q = quota_of(ARGV, 4)
local w, r = quota_wait(KEYS, q, now, prio, tokens)
if w == 0 then
  local left = quota_charge(KEYS, q, now, tokens, r)
  return {0, q.rpm > 0 and floor0(left.req) or -1, q.tpm > 0 and floor0(left.tok) or -1}
end
if w < 0 then return {-1, -1, -1} end
return {math.ceil(w), -1, -1}
