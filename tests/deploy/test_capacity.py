"""`kt capacity estimate` on the capacity guide's own example (50,000 requests/day, 1,500
input and 800 output tokens, peak x3), against figures computed by hand here."""
from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.capacity import CapacityError, estimate, parse_provider
from sidecar.cli import main

# By hand:
#   tokens per request  1,500 + 800                      = 2,300
#   tokens per day      50,000 x 2,300                   = 115,000,000
#   average minute      50,000 / 1,440                   = 34.72 requests
#                       115,000,000 / 1,440              = 79,861 tokens (79,861.1)
#   peak minute x3      34.722 x 3                       = 104.17 requests -> RPM 105
#                       79,861.1 x 3                     = 239,583.3 tokens -> TPM 239,584
#   peak per second     104.17 / 60                      = 1.74 requests/s
#   openai 5,000 RPM / 800,000 TPM: 105 / 5,000 = 2.1% (headroom 97.9%);
#                       239,584 / 800,000 = 29.9% (headroom 70.1%)
#   small 100 RPM / 150,000 TPM: short 5 RPM and 89,584 TPM; ceil(239,584 / 150,000) = 2
#   events              50,000 x 2,000 bytes = 100,000,000 B = 100.0 MB/day,
#                       x30 = 3.00 GB, x90 = 9.00 GB
GUIDE = ["capacity", "estimate", "--requests-per-day", "50000", "--avg-input-tokens", "1500",
         "--avg-output-tokens", "800", "--peak-multiplier", "3"]


def test_the_guides_example_against_figures_computed_by_hand(capsys):
    assert main(GUIDE + ["--provider", "openai=5000:800000", "--provider", "small=100:150000"]) == 0
    out = capsys.readouterr().out
    assert "tokens per day:  115,000,000" in out
    assert "average minute:  34.72 requests, 79,861 tokens" in out
    assert ("peak minute:     104.17 requests, 239,583 tokens -> needs RPM 105, TPM 239,584 "
            "(1.74 requests/s)") in out
    assert ("openai               RPM 105 of 5,000 (2.1%, headroom 97.9%); TPM 239,584 of "
            "800,000 (29.9%, headroom 70.1%)  fits") in out
    assert "SHORT: 5 RPM more and 89,584 TPM more (2 like it)" in out
    assert "100.0 MB per day; 30 days 3.00 GB, 90 days 9.00 GB" in out
    # the cores come from the bench result kt plan reads, for 1.74 requests/s
    assert "sidecar:" in out and "core(s)" in out and "redis:" in out


def test_the_same_figures_as_numbers():
    est = estimate(50_000, 1500, 800, 3, [parse_provider("small=100:150000")])
    assert (est.tokens_per_day, est.rpm_needed, est.tpm_needed) == (115_000_000, 105, 239_584)
    assert est.event_bytes_per_day == 100_000_000
    assert est.event_bytes_retained == {30: 3_000_000_000, 90: 9_000_000_000}
    small = est.providers[0]
    assert (small.providers_needed, small.rpm_short, small.tpm_short) == (2, 5, 89_584)
    assert est.pool is not None and not est.pool.fits


def test_limits_read_from_a_policy_and_what_the_peak_needs(tmp_path: Path, capsys):
    policy = tmp_path / "policy.yaml"
    policy.write_text("""
tiers: [{name: default, model: gpt-4o}, {name: compact, model: gpt-4o-mini}]
providers:
  - {id: east, models: [gpt-4o], rate_limits: {requests_per_minute: 60, tokens_per_minute: 100000}}
  - {id: west, models: [gpt-4o], rate_limits: {requests_per_minute: 60, tokens_per_minute: 100000}}
  - {id: mini, models: [gpt-4o-mini], rate_limits: {tokens_per_minute: 9000000}}
""")
    assert main(GUIDE + ["--config", str(policy), "--model", "gpt-4o"]) == 0
    out = capsys.readouterr().out
    assert "east " in out and "west " in out and "mini " not in out
    # together 120 RPM and 200,000 TPM: short by 39,584 TPM (x1.20); 3 like east alone
    assert ("the peak needs 39,584 TPM more: 3 providers like east to carry it alone, or these "
            "limits raised by 39,584 TPM (x1.20)") in out


@pytest.mark.parametrize("args,message", [
    (["--provider", "openai"], "expected an id from --config, or ID=RPM:TPM"),
    (["--peak-multiplier", "0.5"], "--peak-multiplier must be a number >= 1"),
])
def test_bad_figures_are_one_line_and_exit_2(args, message, capsys):
    argv = [a for a in GUIDE]
    if args[0] == "--peak-multiplier":
        argv[argv.index("--peak-multiplier") + 1] = args[1]
    else:
        argv += args
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_no_requests_is_refused():
    with pytest.raises(CapacityError):
        estimate(0, 1, 1, 3, [])
