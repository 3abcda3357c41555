-- record_spend.lua: spend of a request settled without settle.lua (a reservation whose
-- estimate stays charged: the client left, no usage came, it expired).
--
-- KEYS[1]  spend hash (ledger_spend.lua)                kt:{tenant}:spend
-- ARGV[1]  clock override in µs ("0" in production: the server's TIME)
-- ARGV[2..8]  model, requests, input, output, cache read, cache write tokens, nano-USD
-- ARGV[9..10] optional: the budget period the estimate was charged to (µs) and that
--             charge (the budget's unit), no longer held (common.lua, held_add)
-- Reply: 1

-- (common.lua and ledger_spend.lua are prepended at load)

spend_add(KEYS[1], clock_us(ARGV[1]), ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7],
          ARGV[8])
if ARGV[10] and tonumber(ARGV[9]) >= 0 then
  held_add(string.sub(KEYS[1], 1, -6), tonumber(ARGV[9]), -tonumber(ARGV[10]))
end
return 1
