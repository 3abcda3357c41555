"""Policy fragments the tests share: the two tiers and their prices (and with a price for
gpt-4o's cached prompt tokens, for the ledger's tests)."""

TIERS_AND_PRICING = """
tiers:
  - {name: default, model: gpt-4o}
  - {name: compact, model: gpt-4o-mini}
pricing:
  gpt-4o: {input: 0.0025, output: 0.01}
  gpt-4o-mini: {input: 0.00015, output: 0.0006}
"""

TIERS_AND_CACHE_PRICING = TIERS_AND_PRICING.replace(
    "gpt-4o: {input: 0.0025, output: 0.01}",
    "gpt-4o: {input: 0.0025, output: 0.01, cached_input: 0.00125}")
