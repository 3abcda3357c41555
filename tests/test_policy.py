"""Policy loading: the good file compiles as documented; each bad file fails with its exact message."""
from __future__ import annotations

from pathlib import Path

import pytest

from sidecar import _core
from sidecar.cli import main
from sidecar.policy.load import PolicyError, load_policy
from sidecar.server import sample_policy

FIXTURES = Path(__file__).parent / "fixtures" / "policy"

BAD = {
    "misspelled_key.yaml": "$.defaults.limits: Object contains unknown field `rpmm`",
    "wrong_type.yaml": "$.tenants.acme.limits.rpm: Expected `int | null`, got `str`",
    "bad_period.yaml": ("$.defaults.budget.period: Invalid enum value 'fortnight'; "
                        "expected one of: minute, hour, day, month, total"),
    "no_tiers.yaml": "$.tiers: at least one tier is required",
    "missing_tiers.yaml": "$: Object missing required field `tiers`",
    "both_budget_units.yaml": "$.tenants.acme.budget: set exactly one of `tokens` or `usd`",
    "unpriced_usd.yaml": ("$.tenants.acme.budget: USD budget, but tier 'compact' uses model "
                          "'gpt-4o-mini' which has no entry in `pricing`"),
    "low_water_out_of_range.yaml": "$.defaults.budget.low_water: must be in [0, 1), got 1.5",
    "burst_below_one.yaml": "$.tenants.acme.limits.burst: must be a number in 1..1000, got 0.5",
    "duplicate_tier.yaml": "$.tiers[1].name: duplicate tier name 'default'",
    "not_yaml.yaml": "not valid YAML at line 2, column 1: expected ',' or ']', but got '<scalar>'",
    "not_a_mapping.yaml": "$: expected a mapping at the top level, got list",
    "negative_rpm.yaml": ("$.defaults.limits.rpm: must be in 1..1000000000000, got -5 "
                          "(omit it for no limit: 0 would read as \"nothing\")"),
    "unknown_backend.yaml": "$.backend.kind: Invalid value 'etcd'; expected one of: memory, redis",
    "bad_unknown_mode.yaml": "$.tenant.unknown: Invalid enum value 'allow'; expected one of: defaults, deny",
    "tls_without_rediss.yaml": "$.backend.tls: TLS settings need a rediss:// url",
    "tls_missing_file.yaml": "$.backend.tls.ca_file: no such file: /nonexistent/kt-ca.pem",
    "tls_cert_without_key.yaml": "$.backend.tls: cert_file and key_file go together (mutual TLS)",
    "bad_tenant_metadata.yaml": ('$.tenant.metadata: expected "namespace:path.to.field", e.g. '
                                 '"envoy.filters.http.jwt_authn:jwt_payload.tenant"'),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_policy_fails_with_file_path_and_reason(name):
    path = FIXTURES / name
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert str(info.value) == f"{path}: {BAD[name]}"


def test_every_bad_fixture_has_a_test():
    files = {p.name for p in FIXTURES.glob("*.yaml")} - {"good.yaml"}
    assert files == set(BAD)


def test_a_tls_file_that_is_not_pem_is_a_policy_error(tmp_path):
    junk = tmp_path / "ca.pem"
    junk.write_text("not a certificate")
    path = tmp_path / "policy.yaml"
    path.write_text('tiers: [{name: default, model: gpt-4o}]\n'
                    f'backend: {{kind: redis, url: "rediss://r:6380/0", tls: {{ca_file: "{junk}"}}}}\n')
    with pytest.raises(PolicyError, match=r"\$\.backend\.tls: cannot use these files: "):
        load_policy(path)


def test_missing_file_is_a_policy_error():
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(FIXTURES / "does-not-exist.yaml")


def test_good_policy_compiles_units_and_inheritance():
    p = load_policy(FIXTURES / "good.yaml")
    acme = p.tenants["acme"]
    assert (acme.limits.rpm, acme.limits.tpm, acme.limits.burst) == (600, 200_000, 1.5)
    assert acme.budget_unit == "usd" and acme.limits.budget == 50_000_000_000  # nano-USD
    assert acme.limits.period == _core.P_MONTH and acme.limits.low_water == 0.2
    # USD per 1K tokens -> nano-USD per token, one pair per tier, best first
    assert acme.limits.prices == ((2500, 10000), (150, 600))
    beta = p.tenants["beta"]
    # a tenant's limits override field by field; its budget comes from the defaults
    assert (beta.limits.rpm, beta.limits.tpm) == (5, 20_000)
    assert beta.budget_unit == "tokens" and beta.limits.budget == 100_000
    assert p.rule_for("someone-new") is p.defaults
    assert p.tier_by_model == {"gpt-4o": 0, "gpt-4o-mini": 1}


def test_sample_policy_shipped_in_the_package_loads():
    p = sample_policy()
    assert "acme" in p.tenants and len(p.tiers) == 2


def test_check_config_cli_exit_codes(capsys):
    assert main(["check-config", str(FIXTURES / "good.yaml")]) == 0
    assert "ok (2 tenants, 2 tiers" in capsys.readouterr().out
    assert main(["check-config", str(FIXTURES / "good.yaml"), str(FIXTURES / "no_tiers.yaml")]) == 1
    assert "$.tiers: at least one tier is required" in capsys.readouterr().err
