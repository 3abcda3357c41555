-- record_spend.lua: spend of a request settled without settle.lua (a reservation whose
-- estimate stays charged: the client left, no usage came, it expired).
--
-- KEYS[1]  spend hash (ledger_spend.lua)                kt:{tenant}:spend
-- ARGV[1]  clock override in µs ("0" in production: the server's TIME)
-- ARGV[2..8]  model, requests, input, output, cache read, cache write tokens, nano-USD
-- Reply: 1

-- (common.lua and ledger_spend.lua are prepended at load)

spend_add(KEYS[1], clock_us(ARGV[1]), ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7],
          ARGV[8])
return 1
