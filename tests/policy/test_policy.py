"""Policy loading: the good file compiles as documented; each bad file fails with its exact message."""
from __future__ import annotations

from pathlib import Path

import pytest

from sidecar import _core
from sidecar.cli import main
from sidecar.policy.load import PolicyError, load_policy
from sidecar.server_config import sample_policy

FIXTURES = Path(__file__).parent / "fixtures" / "policy"

BAD = {
    'max_tenants_too_small.yaml': '$.backend.max_tenants: must be an integer in 1000..50000000, got 10 (line 2, column 38)',
    'bad_period.yaml': "$.defaults.budget.period: Invalid enum value 'fortnight'; expected one of: minute, hour, day, week, month, total (line 3, column 34)",
    'bad_tenant_metadata.yaml': '$.tenant.metadata: expected "namespace:path.to.field", e.g. "envoy.filters.http.jwt_authn:jwt_payload.tenant" (line 1, column 20)',
    'bad_unknown_mode.yaml': "$.tenant.unknown: Invalid enum value 'allow'; expected one of: defaults, deny (line 1, column 40)",
    'both_budget_units.yaml': '$.tenants.acme.budget: set exactly one of `tokens` or `usd` (line 5, column 13)',
    'budget_beyond_bound.yaml': '$.tenants.acme.budget.usd: must be a number in 0..9007199, got 10000000.0 (line 6, column 19)',
    'burst_below_one.yaml': '$.tenants.acme.limits.burst: must be a number in 1..1000, got 0.5 (line 4, column 30)',
    'duplicate_tier.yaml': "$.tiers[1].name: duplicate tier name 'default' (line 3, column 12)",
    'inf_budget.yaml': '$.defaults.budget.usd: must be a number in 0..9007199, got inf (line 3, column 17)',
    'inf_burst.yaml': '$.tenants.acme.limits.burst: must be a number in 1..1000, got inf (line 4, column 31)',
    'low_water_out_of_range.yaml': '$.defaults.budget.low_water: must be in [0, 1), got 1.5 (line 3, column 37)',
    'missing_tiers.yaml': '$: Object missing required field `tiers` (line 1, column 1)',
    'misspelled_key.yaml': '$.defaults.limits: Object contains unknown field `rpmm` (line 3, column 12)',
    'nan_chars_per_token.yaml': '$.estimate.chars_per_token: must be a number in 0.01..1000, got nan (line 3, column 20)',
    'nan_low_water.yaml': '$.defaults.budget.low_water: must be in [0, 1), got nan (line 3, column 37)',
    'nan_price.yaml': '$.pricing.gpt-4o.input: must be a number in 0..100 (USD per 1K tokens), got nan (line 3, column 19)',
    'negative_rpm.yaml': '$.defaults.limits.rpm: must be in 1..1000000000000, got -5 (omit it for no limit: 0 would read as "nothing") (line 3, column 17)',
    'no_tiers.yaml': '$.tiers: at least one tier is required (line 1, column 8)',
    'not_a_mapping.yaml': '$: expected a mapping at the top level, got list (line 1, column 1)',
    'not_yaml.yaml': "not valid YAML at line 2, column 1: did not find expected ',' or ']'",
    'price_beyond_bound.yaml': '$.pricing.gpt-4o.output: must be a number in 0..100 (USD per 1K tokens), got 250.0 (line 3, column 35)',
    'three_mistakes.yaml': [
        '$.defaults.limits: Object contains unknown field `tmp` (line 4, column 21)',
        "$.defaults.budget.period: Invalid enum value 'fortnight'; expected one of: minute, hour, day, week, month, total (line 5, column 36)",
        '$.tenants.acme.limits.burst: must be a number in 1..1000, got nan (line 8, column 21)',
    ],
    'tls_cert_without_key.yaml': [
        '$.backend.tls: cert_file and key_file go together (mutual TLS) (line 2, column 67)',
        '$.backend.tls.cert_file: no such file: client.pem (line 2, column 79)',
    ],
    'tls_missing_file.yaml': '$.backend.tls.ca_file: no such file: /nonexistent/kt-ca.pem (line 2, column 77)',
    'tls_without_rediss.yaml': '$.backend.tls: TLS settings need a rediss:// url (line 2, column 62)',
    'unknown_backend.yaml': "$.backend.kind: Invalid value 'etcd'; expected one of: memory, redis (line 2, column 17)",
    'unpriced_usd.yaml': "$.tenants.acme.budget: USD budget, but tier 'compact' uses model 'gpt-4o-mini' which has no entry in `pricing` (line 7, column 13)",
    'wrong_type.yaml': '$.tenants.acme.limits.rpm: Expected `int | null`, got `str` (line 4, column 19)',
    # budget holders (docs/budgets.md)
    'unknown_parent.yaml': "$.tenants.key-1.parent: unknown holder 'team-serch': a parent must be an entry of `tenants` (a team or org may have no limits of its own) (line 4, column 13)",
    'parent_cycle.yaml': '$.tenants.team-a.parent: a cycle of parents: team-a -> org -> team-b -> team-a (line 3, column 20)',
    'budget_and_budgets.yaml': '$.tenants.acme.budgets: set `budget` (one window) or `budgets` (several), not both (line 5, column 14)',
    'two_windows_alike.yaml': '$.tenants.acme.budgets[1]: a second tokens budget per day: one window per unit and period (line 6, column 9)',
    'zero_tpm.yaml': '$.tenants.blocked.limits.tpm: must be in 1..1000000000000, got 0 (omit it for no limit: 0 would read as "nothing") (line 4, column 19)',
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_policy_fails_with_file_path_reason_and_place(name):
    """Each fixture holds one mistake (three_mistakes.yaml three; tls_cert_without_key.yaml
    names a file that does not exist either) and gets exactly these lines, in this order:
    "file: $.path: what (line L, column C)"."""
    path = FIXTURES / name
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    want = BAD[name] if isinstance(BAD[name], list) else [BAD[name]]
    assert info.value.errors == [f"{path}: {line}" for line in want]
    assert str(info.value) == "\n".join(info.value.errors)


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


def test_check_config_reports_every_error_of_a_file_in_one_run(capsys):
    path = FIXTURES / "three_mistakes.yaml"
    assert main(["check-config", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"{path}: {line}" for line in BAD["three_mistakes.yaml"]]


def test_a_json_policy_loads_like_its_yaml_and_its_errors_have_places(tmp_path):
    """JSON is read by msgspec (a generated policy's natural form, far faster than YAML);
    it must mean exactly what the same YAML means, and its errors are located too."""
    import json

    import yaml

    doc = yaml.safe_load((FIXTURES / "good.yaml").read_text())
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(doc, indent=1))
    from_json, from_yaml = load_policy(path), load_policy(FIXTURES / "good.yaml")
    assert from_json.tenants.keys() == from_yaml.tenants.keys()
    for name, rule in from_yaml.tenants.items():
        other = from_json.tenants[name]
        assert (other.limits.rpm, other.limits.tpm, other.limits.burst, other.limits.budget,
                other.limits.prices, other.budget_unit) == (
                    rule.limits.rpm, rule.limits.tpm, rule.limits.burst, rule.limits.budget,
                    rule.limits.prices, rule.budget_unit)
    doc["tenants"]["acme"]["limits"]["burst"] = 0.5
    path.write_text(json.dumps(doc, indent=1))
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    line, col = next((i, text.index("0.5") + 1) for i, text in
                     enumerate(path.read_text().splitlines(), 1) if '"burst"' in text)
    assert str(info.value) == (f"{path}: $.tenants.acme.limits.burst: must be a number in "
                               f"1..1000, got 0.5 (line {line}, column {col})")


def test_identical_limits_are_compiled_once():
    p = load_policy(FIXTURES / "good.yaml")
    assert p.rule_for("a") is p.defaults
    twins = (FIXTURES / "good.yaml").read_text().replace(
        "  beta:\n", "  gamma: {limits: {rpm: 5}}\n  beta:\n")
    from sidecar.policy.load import parse_policy

    q = parse_policy(twins.encode(), "<twins>")
    assert q.tenants["gamma"].limits is q.tenants["beta"].limits


RELOAD_GOOD = "tiers: [{name: default, model: m}]\ndefaults: {limits: {rpm: 5}}\n"


def test_the_reloader_refuses_bad_values_survives_any_exception_and_applies_a_later_fix(
        tmp_path, monkeypatch):
    """Issue 11: a reload with a NaN price or an out-of-range value killed the reload task
    silently, so later valid edits were never applied. Through the server's own reload loop:
    a NaN (refused, counted), an unexpected exception in the loader (counted, logged), then
    a valid edit, which must be served."""
    import asyncio
    import os

    from sidecar.backends.memory import MemoryBackend
    from sidecar.ledger.recorder import Ledger
    from sidecar.server import Sidecar
    from sidecar.server_config import ServerConfig

    path = tmp_path / "policy.yaml"
    path.write_text(RELOAD_GOOD)
    stamp = iter(range(1, 100))

    def write(text: str) -> None:
        path.write_text(text)
        n = next(stamp)
        os.utime(path, ns=(n, n))  # a new stamp even within one mtime tick

    async def main():
        sc = Sidecar(ServerConfig(grpc_addr="127.0.0.1:0", http_addr="127.0.0.1:0",
                                  admin_addr="127.0.0.1:0",  # not the default 9091: may be taken
                                  policy_path=str(path), reload_interval_s=0.02, grace_s=0.1),
                     backend=MemoryBackend(), ledger=Ledger(None))
        await sc.start()

        def count(result: str) -> float:
            return sc.metrics.registry.get_sample_value("kt_policy_reloads_total",
                                                        {"result": result}) or 0.0

        async def until(check) -> None:
            for _ in range(500):  # poll with a deadline, never a fixed sleep
                if check():
                    return
                await asyncio.sleep(0.01)
            raise AssertionError("the reloader did not get there")

        try:
            write(RELOAD_GOOD.replace("{rpm: 5}", "{rpm: 5, burst: .nan}"))
            await until(lambda: count("error") == 1)
            assert sc.service.policy.defaults.limits.rpm == 5

            def broken(_path):
                raise RuntimeError("a bug in the loader")
            # the server's loader (the file with the management API's overlay over it)
            monkeypatch.setattr(sc._reloader, "load", broken)
            write(RELOAD_GOOD.replace("{rpm: 5}", "{rpm: 6}"))
            await until(lambda: count("error") == 2)
            monkeypatch.undo()
            assert not sc._reload_task.done()  # the loop lives on
            write(RELOAD_GOOD.replace("{rpm: 5}", "{rpm: 7}"))
            await until(lambda: count("ok") == 1)
            assert sc.service.policy.defaults.limits.rpm == 7
        finally:
            await sc.stop()

    asyncio.run(main())


def test_a_policy_larger_than_one_conversion_chunk_compiles_every_tenant_and_names_errors():
    from sidecar.policy import load as policy_load
    from sidecar.policy.load import parse_policy

    n = policy_load._TENANT_CHUNK + 500
    lines = ["tiers: [{name: default, model: m}]", "tenants:"]
    lines += [f"  t{i}: {{limits: {{rpm: {i + 1}}}}}" for i in range(n)]
    good = parse_policy("\n".join(lines).encode(), "<big>")
    assert len(good.tenants) == n and good.tenants[f"t{n - 1}"].limits.rpm == n
    lines[2 + n - 3] = f"  t{n - 3}: {{limits: {{rpm: {n - 2}, burst: .nan}}}}"
    with pytest.raises(PolicyError) as info:
        parse_policy("\n".join(lines).encode(), "<big>")
    col = lines[2 + n - 3].index(".nan") + 1
    assert info.value.errors == [f"<big>: $.tenants.t{n - 3}.limits.burst: must be a number "
                                 f"in 1..1000, got nan (line {n}, column {col})"]


def test_a_tree_deeper_than_its_bound_is_refused_in_one_line():
    from sidecar.policy.holders import MAX_DEPTH
    from sidecar.policy.load import parse_policy

    levels = [f"  h{i}: {{parent: h{i + 1}}}" for i in range(MAX_DEPTH)] + [f"  h{MAX_DEPTH}: {{}}"]
    text = "tiers: [{name: d, model: m}]\ntenants:\n" + "\n".join(levels)
    with pytest.raises(PolicyError) as info:
        parse_policy(text.encode(), "deep.yaml")
    assert info.value.errors == [
        f"deep.yaml: $.tenants.h0.parent: more than {MAX_DEPTH} levels of parents (line 3, column 16)"]
    # one level less loads, and its deepest key is decided on every level
    ok = parse_policy("\n".join(text.split("\n")[:2] + text.split("\n")[3:]).encode(), "x")
    assert len(ok.tenants["h1"].path.cells) == 1  # no level has limits of its own


def test_a_cycle_does_not_hide_the_other_tenants_errors():
    from sidecar.policy.load import parse_policy

    text = ("tiers: [{name: d, model: m}]\ntenants:\n  a: {parent: b}\n  b: {parent: a}\n"
            "  c: {budget: {tokens: 5, period: day, timezone: Mars/Olympus}}\n")
    with pytest.raises(PolicyError) as info:
        parse_policy(text.encode(), "p.yaml")
    assert info.value.errors == [
        "p.yaml: $.tenants.a.parent: a cycle of parents: a -> b -> a (line 3, column 15)",
        "p.yaml: $.tenants.c.budget.timezone: unknown IANA time zone 'Mars/Olympus' (e.g. "
        "Europe/Berlin) (line 5, column 50)"]
