"""Red-team probe: the model a client names in the body reaches the provider unchanged.

  PYTHONPATH=. python bench/redteam_model.py

The stack of bench/attacks.py (`kt serve`, embedded backend; Envoy from `kt envoy-config`'s
renderer; the fake upstream, which serves whatever model the body names and reports it).
The policy prices gpt-4o and gpt-4o-mini; the client asks for "o1-pro" (not in pricing),
1,000 input and 4,000 output tokens. Printed: the status, the tenant's spend (GET
/v1/spend), kt_unpriced_tokens_total, and the bill at o1-pro's list price (USD 150 / 600
per million input / output tokens) as a provider would charge the operator's key.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.attacks import CHARGE_POLICY, request, target  # noqa: E402

O1_PRO = (150e-6, 600e-6)  # USD per token, list price
USAGE = (1000, 4000)


def main() -> int:
    policy = CHARGE_POLICY % {"max_out": ", max_output_tokens: 16384"}
    with target(policy) as t:
        body = {"model": "o1-pro", "max_tokens": 4000,
                "messages": [{"role": "user", "content": "hi"}]}
        status, _, reply = request(t.envoy.listen_port, "POST", "/v1/chat/completions",
                                   json.dumps(body).encode(), {
                                       "content-type": "application/json",
                                       "x-tenant-id": "picker", "x-fake-usage": "%d,%d" % USAGE})
        t.sidecar.wait_usage_delivered()
        _, _, spend = request(t.books_port, "GET", "/v1/spend", headers=t.books_headers())
        cells = json.loads(spend)["tenants"].get("picker", {})
        spend_usd = sum(c["usd"] for c in cells.values())
        bill = USAGE[0] * O1_PRO[0] + USAGE[1] * O1_PRO[1]
        metrics = t.sidecar.metrics()
        unpriced = [line for line in metrics.splitlines()
                    if line.startswith("kt_unpriced_tokens_total")]
        print(json.dumps({"status": status, "served_model": json.loads(reply)["model"],
                          "spend_usd": spend_usd, "bill_usd_at_o1_pro_price": bill,
                          "spend_over_bill": round(spend_usd / bill, 4),
                          "unpriced_metric": unpriced}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
