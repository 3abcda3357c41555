"""The policy's providers, routing and queue: the good file compiles as docs/providers.md
says; each bad file fails with its exact message (file, field path, expectation)."""
from __future__ import annotations

from pathlib import Path

import pytest

from sidecar import _core
from sidecar.cli import main
from sidecar.policy.load import PolicyError, load_policy
from tests.policy.test_policy import FIXTURES as BASE_FIXTURES

FIXTURES = Path(__file__).parent / "fixtures" / "providers"

# each bad file's one error, as kt check-config prints it (after the file name)
BAD = {
    'api_key_without_host.yaml':
        "$.providers[0].host: a provider Envoy reaches (ca_file, api_key_file) needs a `host` "
        "(line 3, column 5)",
    'bad_provider_id.yaml':
        "$.providers[0].id: 'open ai/{x}': 1..64 characters of A-Z a-z 0-9 . _ - expected (line 3, column 10)",
    'bad_strategy.yaml':
        "$.routing.gpt-4o.strategy: Invalid enum value 'random'; expected one of: weighted, priority (line 5, column 22)",
    'burst_too_small.yaml':
        '$.providers[0].rate_limits.burst: requests_per_minute x burst = 0.5: the bucket would never hold one request (line 3, column 76)',
    'duplicate_provider.yaml':
        "$.providers[1].id: duplicate provider id 'a' (line 4, column 10)",
    'misspelled_rate_limit.yaml':
        '$.providers[0].rate_limits: Object contains unknown field `request_per_minute` (line 3, column 45)',
    'negative_provider_rpm.yaml':
        '$.providers[0].rate_limits.requests_per_minute: must be in 1..1000000000000, got -5 (omit it for no limit) (line 3, column 66)',
    'order_with_weighted.yaml':
        '$.routing.gpt-4o.order: `order` goes with strategy: priority (line 5, column 39)',
    'port_without_host.yaml':
        '$.providers[0].port: a port needs a `host` (line 3, column 37)',
    'queue_bad_overflow.yaml':
        "$.queue.overflow: Invalid enum value 'drop_oldest'; expected one of: reject (line 2, column 37)",
    'queue_wait_too_long.yaml':
        "$.queue.max_wait_ms: must be between 1 and 60000 (and under Envoy's ext_authz timeout: `kt envoy-config` sets it) (line 2, column 22)",
    'reserve_low.yaml':
        '$.providers[0].reserve.low: nothing can be kept for `low`: it is the lowest priority (reserve for `normal` or `high`) (line 3, column 46)',
    'reserve_out_of_range.yaml':
        '$.providers[0].reserve.high: a share in [0, 1) expected, got 1.5 (line 3, column 47)',
    'reserve_sum.yaml':
        '$.providers[0].reserve: the shares add up to 1; they must leave something below 1 for the lowest priority (line 3, column 40)',
    'routing_unknown_model.yaml':
        "$.routing.gpt-4: no tier uses model 'gpt-4'; expected one of: gpt-4o (line 5, column 10)",
    'routing_without_providers.yaml':
        '$.routing: routing needs a `providers:` section (line 3, column 3)',
    'tier_model_unserved.yaml':
        "$.tiers[1].model: no provider serves 'gpt-4o-mini' (add it to a provider's `models`) (line 3, column 28)",
    'weight_not_positive.yaml':
        '$.routing.gpt-4o.weights.a: a weight > 0 expected, got 0.0 (line 5, column 45)',
    'weights_provider_not_serving.yaml':
        "$.routing.gpt-4o.weights.m: provider 'm' does not serve 'gpt-4o' (its models: gpt-4o-mini) (line 6, column 51)",
    'weights_unknown_provider.yaml':
        "$.routing.gpt-4o.weights.b: no provider has the id 'b' (line 5, column 51)",
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_provider_policy_fails_with_file_path_and_reason(name):
    path = FIXTURES / name
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert str(info.value) == f"{path}: {BAD[name]}"


def test_every_mistake_of_a_file_is_reported_at_once_with_its_place(tmp_path):
    path = tmp_path / "three-mistakes.yaml"
    path.write_text("""tiers: [{name: default, model: gpt-4o}, {name: compact, model: gpt-4o-mini}]
providers:
  - {id: a, models: [gpt-4o], reserve: {high: 1.5}}
  - {id: a, models: [gpt-4o]}
routing:
  gpt-4o: {strategy: weighted, weights: {nobody: 1}}
""")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert [e.split(": ", 1)[1] for e in info.value.errors] == [
        "$.providers[0].reserve.high: a share in [0, 1) expected, got 1.5 (line 3, column 47)",
        "$.providers[1].id: duplicate provider id 'a' (line 4, column 10)",
        "$.tiers[1].model: no provider serves 'gpt-4o-mini' (add it to a provider's `models`) "
        "(line 1, column 64)",
        "$.routing.gpt-4o.weights.nobody: no provider has the id 'nobody' (line 6, column 50)",
    ]


def test_every_bad_provider_fixture_has_a_test():
    assert {p.name for p in FIXTURES.glob("*.yaml")} - {"good.yaml"} == set(BAD)


def test_good_policy_compiles_quotas_floors_routes_and_priorities():
    p = load_policy(FIXTURES / "good.yaml")
    plan = p.providers
    assert plan is not None
    east, azure, spare, mini = plan.providers
    assert (east.quota.rpm, east.quota.tpm, east.quota.rpd) == (5000, 800_000, 2_000_000)
    # reserve {high: 0.2, normal: 0.1}: low leaves 30%, normal 20%, high nothing
    assert east.quota.floors == pytest.approx((0.3, 0.2, 0.0))
    assert azure.quota.req_cap == 900 and azure.quota.tok_cap == 150_000  # burst 0.5
    # where each lives: TLS on 443 unless told; a plain port means plain HTTP
    assert (east.host, east.port, east.tls) == ("api.openai.com", 443, True)
    assert (spare.host, spare.port, spare.tls) == ("10.0.0.7", 8000, False)
    # weighted: the weighted providers by weight, then the others serving the model
    r = plan.routes["gpt-4o"]
    assert (r.strategy, r.providers, r.weights) == ("weighted", (0, 1, 2), (70.0, 30.0))
    assert plan.routes["gpt-4o-mini"].providers == (3, 2)  # the order, then the rest
    assert (p.tenants["checkout"].priority_rank, p.tenants["checkout"].spill_to_next_tier) == (
        _core.PRIO_HIGH, True)
    assert (p.tenants["batch"].priority_rank, p.tenants["batch"].spill_to_next_tier) == (
        _core.PRIO_LOW, False)
    assert p.defaults.priority_rank == _core.PRIO_NORMAL
    assert p.queue is not None and (p.queue.max_wait_ms, p.queue.max_size) == (1500, 200)


def test_a_policy_without_providers_compiles_as_before():
    p = load_policy(BASE_FIXTURES / "good.yaml")
    assert p.providers is None and p.queue is None


def test_check_config_names_providers_and_queue(capsys):
    assert main(["check-config", str(FIXTURES / "good.yaml")]) == 0
    out = capsys.readouterr().out
    assert "4 providers" in out and "queue 1500 ms" in out
    assert main(["check-config", str(FIXTURES / "reserve_sum.yaml")]) == 1
    assert "reserve_sum.yaml: $.providers[0].reserve: the shares add up" in capsys.readouterr().err
