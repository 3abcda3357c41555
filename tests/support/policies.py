"""Policy fragments the tests share: the two tiers and their prices."""

TIERS_AND_PRICING = """
tiers:
  - {name: default, model: gpt-4o}
  - {name: compact, model: gpt-4o-mini}
pricing:
  gpt-4o: {input: 0.0025, output: 0.01}
  gpt-4o-mini: {input: 0.00015, output: 0.0006}
"""
