"""kt: the command line. Thin: parse arguments, call into the package.

Imports only the standard library at the top: until main() holds SIGINT and SIGTERM
(sidecar/stop_signals.py), a signal would interrupt whatever is being imported."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from sidecar import stop_signals


def _serve(args: argparse.Namespace) -> int:
    from sidecar.address import AddressError, parse_hostport
    from sidecar.backends.base import BackendError
    from sidecar.policy.load import PolicyError
    from sidecar.credentials import ExposureError
    from sidecar.listen import StartupError
    from sidecar.server import serve
    from sidecar.server_config import ServerConfig

    if args.workers < 1:
        print("kt serve: --workers must be >= 1", file=sys.stderr)
        return 2
    try:  # a typo in an address is caught before anything starts
        for flag, value in (("--grpc", args.grpc), ("--http", args.http),
                            ("--http-authz", args.http_authz), ("--admin", args.admin)):
            if value is not None:
                parse_hostport(value, flag, allow_zero=True)
    except AddressError as exc:
        print(f"kt serve: {exc}", file=sys.stderr)
        return 2
    if args.otlp_endpoint:
        from sidecar.tracing import AVAILABLE, TracingError, check_sample_ratio, traces_url

        try:
            traces_url(args.otlp_endpoint)
            check_sample_ratio(args.otlp_sample_ratio)
            if not AVAILABLE:
                raise TracingError("--otlp-endpoint needs OpenTelemetry's SDK and OTLP "
                                   "exporter: pip install 'kt-sidecar[otlp]'")
        except TracingError as exc:
            print(f"kt serve: {exc}", file=sys.stderr)
            return 2
    if args.workers > 1:
        from sidecar.workers import WorkerError, WorkerExited, supervise

        try:
            return supervise(args, args.workers)
        except WorkerExited as exc:
            if not exc.explained:  # otherwise the worker printed its own one line
                print(f"kt serve: {exc}", file=sys.stderr)
            return exc.code or 1
        except (WorkerError, PolicyError, ExposureError) as exc:
            print(f"kt serve: {exc}", file=sys.stderr)
            return 2
        except StartupError as exc:
            print(f"kt serve: {exc}", file=sys.stderr)
            return 4
    cfg = ServerConfig(grpc_addr=args.grpc, http_addr=args.http, policy_path=args.config,
                       state_file=args.state_file, ready_file=args.ready_file,
                       http_authz_addr=args.http_authz, reuse_port=args.worker_of_supervisor,
                       share_reservations=args.worker_of_supervisor,
                       admin_addr=args.admin, admin_token_file=args.admin_token_file,
                       grpc_token_file=args.grpc_token_file, grpc_tls_cert=args.grpc_tls_cert,
                       grpc_tls_key=args.grpc_tls_key, grpc_client_ca=args.grpc_client_ca,
                       otlp_endpoint=args.otlp_endpoint,
                       otlp_sample_ratio=args.otlp_sample_ratio)
    import uvloop

    try:
        uvloop.run(serve(cfg))
    except ExposureError as exc:  # one line: which listener, and what it needs
        print(f"kt serve: {exc}", file=sys.stderr)
        return 2
    except PolicyError as exc:
        print(f"kt serve: {exc}", file=sys.stderr)
        return 2
    except BackendError as exc:
        print(f"kt serve: backend: {exc}", file=sys.stderr)
        return 3
    except StartupError as exc:
        print(f"kt serve: {exc}", file=sys.stderr)
        return 4
    except OSError as exc:
        print(f"kt serve: {exc}", file=sys.stderr)
        return 4
    return 0


def _check_config(args: argparse.Namespace) -> int:
    from sidecar.envoy_config import policy_warnings
    from sidecar.policy.load import PolicyError, load_policy

    ok = True
    for path in args.files:
        try:
            p = load_policy(path)
        except PolicyError as exc:
            print(exc, file=sys.stderr)
            ok = False
            continue
        extra = f"{len(p.providers.providers)} providers, " if p.providers else ""
        extra += f"queue {p.queue.max_wait_ms} ms, " if p.queue else ""
        print(f"{path}: ok ({len(p.tenants)} tenants, {len(p.tiers)} tiers, {extra}"
              f"backend {type(p.backend).__name__}, digest {p.digest})")
        for warning in policy_warnings(p):
            print(f"{path}: warning: {warning}", file=sys.stderr)
    return 0 if ok else 1


def _envoy_config(args: argparse.Namespace) -> int:
    from sidecar.address import AddressError, parse_hostport
    from sidecar.endpoints import EndpointError, parse_endpoint
    from sidecar.policy.load import PolicyError, load_policy
    from sidecar.envoy_config import (JWT_NAMESPACE, EnvoyOptions, TierRoute, Upstream,
                                      UpstreamError, parse_upstream, render,
                                      sidecar_credential_note)
    from sidecar.server_config import sample_policy

    try:
        policy = load_policy(args.config) if args.config else sample_policy()
    except PolicyError as exc:
        print(f"kt envoy-config: {exc}", file=sys.stderr)
        return 2
    tier_names = [t.name for t in policy.tiers]
    try:
        upstreams: dict[str, list[Upstream]] = {}
        for flag in args.upstream:
            tier, eq, spec = flag.partition("=")
            if not eq or not tier or not spec:
                raise UpstreamError(f"--upstream {flag!r}: expected TIER=HOST:PORT or "
                                    "TIER=https://HOST[:PORT][,weight=N,...]")
            if tier not in tier_names:
                raise UpstreamError(f"--upstream {flag!r}: unknown tier {tier!r} (the "
                                    f"policy's tiers: {', '.join(tier_names)})")
            upstreams.setdefault(tier, []).append(parse_upstream(spec, f"--upstream {tier}="))
        default = parse_upstream(args.default_upstream, "--default-upstream")
        tiers = [TierRoute(t.name, t.model, upstreams.get(t.name, [default]))
                 for t in policy.tiers]

        for t in tiers:
            t.upstreams()  # names clash?
        lhost, lport = parse_hostport(args.listen, "--listen")
        ahost, aport = parse_hostport(args.admin, "--admin")
        parse_hostport(args.sidecar, "--sidecar")
        parse_hostport(args.sidecar_http, "--sidecar-http")
        passed = tuple(parse_endpoint(spec) for spec in args.pass_path)
    except (AddressError, EndpointError) as exc:
        print(f"kt envoy-config: {exc}", file=sys.stderr)
        return 2
    opts = EnvoyOptions(
        listen_host=lhost, listen_port=lport, admin_host=ahost, admin_port=aport,
        sidecar_address=args.sidecar, sidecar_http_address=args.sidecar_http, tiers=tiers,
        mode=args.mode, usage=args.usage,
        failure_mode=args.failure_mode, tenant_header=policy.tenant_header,
        estimate_header=policy.estimate.header, estimate_trusted=policy.estimate.trusted,
        attribution_headers=(policy.attribution.user_header, policy.attribution.tags_header),
        attribution_trusted=policy.attribution.trusted,
        tenant_metadata_namespace=policy.tenant_metadata[0] if policy.tenant_metadata else "",
        jwt_issuer=args.jwt_issuer or "", jwt_jwks_file=args.jwt_jwks_file or "",
        jwt_audiences=tuple(args.jwt_audience), sidecar_token_file=args.sidecar_token_file or "",
        sidecar_tls_cert=args.sidecar_tls_cert or "", sidecar_tls_key=args.sidecar_tls_key or "",
        sidecar_ca=args.sidecar_ca or "", sidecar_sni=args.sidecar_sni or "",
        pass_endpoints=passed, **provider_options(policy))
    if opts.tenant_metadata_namespace == JWT_NAMESPACE and not opts.jwt_jwks_file:
        print("kt envoy-config: the policy takes the tenant from a JWT claim, but no jwt_authn "
              "filter would validate one: give the issuer and its keys (--jwt-issuer, "
              "--jwt-jwks-file)", file=sys.stderr)
        return 2
    try:
        text = render(opts)
    except ValueError as exc:  # options that cannot work together
        print(f"kt envoy-config: {exc}", file=sys.stderr)
        return 2
    note = sidecar_credential_note(opts)
    if note:
        print(f"kt envoy-config: note: {note}", file=sys.stderr)
    for note in rls_timeout_notes(policy, opts):
        print(f"kt envoy-config: note: {note}", file=sys.stderr)
    defaulted = [t for t in tier_names if t not in upstreams]
    if defaulted:  # said in the config, not silent: production must not send them there
        text = (f"# Tier(s) {', '.join(defaulted)}: no --upstream given, routed to "
                f"--default-upstream {args.default_upstream}\n") + text
    sys.stdout.write(text)
    return 0


def rls_timeout_notes(policy, opts) -> list[str]:
    """Under RLS Envoy waits ``rls_timeout_s`` (20 ms): a Redis backend whose store-silence
    allowance is longer leaves a stalled store to Envoy's failure mode, not the policy's."""
    from sidecar.policy import schema

    backend = policy.backend
    if opts.mode != "rls" or not isinstance(backend, schema.RedisBackend):
        return []
    if backend.timeout_ms < opts.rls_timeout_s * 1000:
        return []
    return [f"backend.timeout_ms is {backend.timeout_ms} ms, not under Envoy's RLS timeout "
            f"({opts.rls_timeout_s * 1000:.0f} ms): a stalled Redis would be answered by "
            "Envoy's failure mode, not the policy's; set timeout_ms to 15 for RLS "
            "(docs/redis.md)"]


def provider_options(policy) -> dict:
    """EnvoyOptions from the policy's providers and queue (docs/providers.md): one cluster
    per provider with a host, and an ext_authz timeout above the queue's longest wait."""
    from sidecar.envoy_config import EnvoyOptions, Upstream
    # Envoy's ext_authz timeout over the admission queue's longest wait: the last decision
    # after the wait, and the answer's way back (the queue ends its waits this much before)
    from sidecar.decision.queue import CALLER_MARGIN_S

    out: dict = {}
    if policy.providers is not None:
        out["providers"] = [
            Upstream(host=p.host, port=p.port, tls=p.tls, name=p.id, sni=p.sni or "",
                     api_key_file=p.api_key_file or "", api_key_header=p.api_key_header,
                     **({"ca_file": p.ca_file} if p.ca_file else {}))
            for p in policy.providers.providers if p.host]
    if policy.queue is not None:
        out["authz_timeout_s"] = max(EnvoyOptions.authz_timeout_s,
                                     policy.queue.max_wait_ms / 1000 + CALLER_MARGIN_S)
        out["sidecar_queue_places"] = policy.queue.max_size
    return out


def _admin_get(args: argparse.Namespace, command: str, path: str, query: str = "") -> dict:
    """GET a JSON document from the admin port (sidecar/admin_client.py: one line on failure)."""
    from sidecar.admin_client import admin_call

    return admin_call(args, command, path, query)


def _status(args: argparse.Namespace) -> int:
    import json

    from sidecar.admin_client import AdminFailed
    from sidecar.status import render

    try:
        doc = _admin_get(args, "status", "/v1/status")
    except AdminFailed as failed:
        return failed.args[0]
    try:
        text = json.dumps(doc, indent=2, sort_keys=True) + "\n" if args.json else render(doc)
        ready = bool(doc.get("ready"))
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        # not the document a sidecar's admin port serves: one line, not a traceback
        print(f"kt status: {args.admin} answered something that is not a status document "
              f"({type(exc).__name__}: {str(exc)[:80]})", file=sys.stderr)
        return 1
    sys.stdout.write(text)
    return 0 if ready else 3


def _spend(args: argparse.Namespace) -> int:
    import json
    import urllib.parse

    from sidecar.admin_client import AdminFailed

    query = urllib.parse.urlencode({k: v for k, v in (
        ("since", args.since), ("until", args.until), ("period", args.period),
        ("by", args.by), ("tenant", args.tenant)) if v})
    try:
        doc = _admin_get(args, "spend", "/v1/spend", query)
    except AdminFailed as failed:
        return failed.args[0]
    if args.json:  # stable: tenants -> [period ->] model -> counts (docs/ledger.md)
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0
    period = doc.get("period", "total")
    if args.by:  # one row per group (and period): the groups' own names, bounded by the sidecar
        print(f"{args.by:<32} {'period':<10} {'requests':>9} {'input':>12} {'output':>12} "
              f"{'cached':>10} {'usd':>16}")
        for g, by in sorted(doc["groups"].items()):
            for p, v in sorted(({"": by} if period == "total" else by).items()):
                print(f"{g:<32} {p or 'all':<10} {v.get('requests', 0):>9} "
                      f"{v['input_tokens']:>12} {v['output_tokens']:>12} "
                      f"{v.get('cached_tokens', 0):>10} {v['usd']:>16.9f}")
        return 0
    rows = []
    for t, by in sorted(doc["tenants"].items()):
        periods = {"": by} if period == "total" else by
        for p, models in sorted(periods.items()):
            for m, v in sorted(models.items()):
                rows.append((t, p, m, v))
    print(f"{'tenant':<24} {'period':<10} {'model':<24} {'requests':>9} {'input':>12} "
          f"{'output':>12} {'cached':>10} {'usd':>16}")
    for t, p, m, v in rows:
        print(f"{t:<24} {p or 'all':<10} {m:<24} {v.get('requests', 0):>9} "
              f"{v['input_tokens']:>12} {v['output_tokens']:>12} {v.get('cached_tokens', 0):>10} "
              f"{v['usd']:>16.9f}")
    held = doc.get("held") or {}
    if held:
        # what each budget holds now for requests not settled yet and leased capacity:
        # settled (above) + held = what the budget holds (docs/ledger.md, "Held")
        print("\nheld for open requests (now, whatever the range):")
        print(f"{'tenant':<24} {'unit':<8} {'amount':>20} {'usd':>16}")
        for t, h in sorted(held.items()):
            usd = f"{h['usd']:>16.9f}" if "usd" in h else f"{'':>16}"
            print(f"{t:<24} {h.get('unit') or '-':<8} {h['amount']:>20} {usd}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from sidecar.plan import PlanError, plan

    try:
        print(plan(args.results, args.rps, args.transport, args.profile, args.headroom).text())
    except PlanError as exc:
        print(f"kt plan: {exc}", file=sys.stderr)
        return 2
    return 0


def _capacity_estimate(args: argparse.Namespace) -> int:
    import dataclasses

    from sidecar.capacity import (CapacityError, estimate, parse_provider,
                                  providers_from_policy)
    from sidecar.plan import PlanError, plan
    from sidecar.policy.load import PolicyError, load_policy

    try:
        if args.config:
            policy = load_policy(args.config)
            providers = providers_from_policy(policy, args.model or "", [
                p for p in args.provider if "=" not in p]) + [
                parse_provider(p) for p in args.provider if "=" in p]
        else:
            providers = [parse_provider(p) for p in args.provider]
        est = estimate(args.requests_per_day, args.avg_input_tokens, args.avg_output_tokens,
                       args.peak_multiplier, providers, args.model or "")
        try:
            cores = plan(args.results, est.peak_requests_per_second).text()
        except PlanError as exc:
            cores = f"no bench result to size from ({exc})"
        print(dataclasses.replace(est, cores=cores).text())
    except (CapacityError, PolicyError) as exc:
        print(f"kt capacity estimate: {exc}", file=sys.stderr)
        return 2
    return 0


def _admin_client_args(p: argparse.ArgumentParser) -> None:
    from sidecar.admin_client import client_args

    client_args(p)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kt-sidecar")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kt", description="kt-sidecar: rate limits and budgets "
                                "for LLM traffic behind Envoy.")
    p.add_argument("--version", action="version", version=f"kt-sidecar {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the sidecar (gRPC ext_authz + RLS, HTTP side port)")
    s.add_argument("--config", help="policy YAML (default: the sample policy, embedded backend)")
    s.add_argument("--grpc", default="127.0.0.1:8081", help="gRPC listen HOST:PORT")
    s.add_argument("--http", default="127.0.0.1:9090", help="HTTP side port HOST:PORT "
                   "(/metrics, /healthz, /readyz only: safe to expose to Prometheus and probes)")
    s.add_argument("--admin", default="127.0.0.1:9091", metavar="HOST:PORT",
                   help="admin port: POST /v1/usage, GET /v1/spend, each with "
                   "`Authorization: Bearer <token>`; beyond loopback only with a token")
    s.add_argument("--admin-token-file", metavar="FILE",
                   help="the admin API's bearer token (else the policy's admin.token_file; "
                   "without one the admin port serves loopback callers only)")
    s.add_argument("--grpc-token-file", metavar="FILE",
                   help="a token every gRPC call (and fast-path request) must carry as "
                   "`authorization: Bearer <token>`; required to bind --grpc or --http-authz "
                   "beyond loopback unless gRPC uses mTLS")
    s.add_argument("--grpc-tls-cert", metavar="PEM", help="gRPC server certificate (TLS)")
    s.add_argument("--grpc-tls-key", metavar="PEM", help="gRPC server private key (TLS)")
    s.add_argument("--grpc-client-ca", metavar="PEM",
                   help="CA of the client certificates gRPC requires (mTLS)")
    s.add_argument("--http-authz", metavar="HOST:PORT",
                   help="also serve Envoy's HTTP ext_authz here (the fast path)")
    s.add_argument("--workers", type=int, default=1,
                   help="processes sharing the gRPC and HTTP-authz ports (redis backend only); "
                   "the side port (--http) serves them as one sidecar: summed /metrics, "
                   "/readyz ready when every worker is")
    s.add_argument("--worker-of-supervisor", action="store_true", help=argparse.SUPPRESS)
    s.add_argument("--otlp-endpoint", metavar="URL",
                   help="send a span per request (OpenTelemetry GenAI conventions) to this "
                   "OTLP/HTTP collector, e.g. http://127.0.0.1:4318 (/v1/traces added to a URL "
                   "without a path); needs pip install 'kt-sidecar[otlp]'")
    s.add_argument("--otlp-sample-ratio", type=float, default=1.0, metavar="R",
                   help="the share of requests that get a span (default 1: every one; a "
                   "span costs about 150 µs of CPU, docs/deploy.md)")
    s.add_argument("--state-file", help="embedded backend: where budget spend is persisted")
    s.add_argument("--ready-file", help="write {grpc_port, http_port} as JSON here once serving")
    s.add_argument("--log-level", default="INFO")
    s.set_defaults(func=_serve)

    c = sub.add_parser("check-config", help="validate policy files; exit 1 on any error")
    c.add_argument("files", nargs="+")
    c.set_defaults(func=_check_config)

    e = sub.add_parser(
        "envoy-config", help="print an Envoy bootstrap wired to the sidecar",
        description="Print an Envoy bootstrap wired to the sidecar. Every FILE given here "
        "(key-file=, ca=, --sidecar-tls-*, --sidecar-ca, --sidecar-token-file, "
        "--jwt-jwks-file, a provider's api_key_file/ca_file) is written into the config as "
        "given and opened by Envoy when it starts: a relative path is resolved against "
        "Envoy's working directory, not this command's nor the config file's directory "
        "(docs/deploy.md, \"Files Envoy reads\").")
    e.add_argument("--config", help="policy YAML whose tiers become routes (default: sample)")
    e.add_argument("--listen", default="127.0.0.1:10000", help="Envoy listener HOST:PORT")
    e.add_argument("--admin", default="127.0.0.1:9901", help="Envoy admin HOST:PORT")
    e.add_argument("--sidecar", default="127.0.0.1:8081", help="the sidecar's gRPC HOST:PORT")
    e.add_argument("--upstream", action="append", default=[], metavar="TIER=UPSTREAM",
                   help="an upstream of a tier, repeatable (several for one tier: weighted, "
                   "with failover by priority). UPSTREAM is HOST:PORT (TLS when the port is "
                   "443) or http(s)://HOST[:PORT], then optional ,weight=N ,priority=N "
                   ",name=ID ,sni=NAME ,ca=FILE ,key-file=FILE (the provider's API key, "
                   "injected by Envoy; a relative FILE is opened from Envoy's working "
                   "directory) ,key-header=HEADER (default authorization: Bearer)")
    e.add_argument("--default-upstream", default="127.0.0.1:8000", metavar="UPSTREAM",
                   help="upstream of every tier without --upstream (default 127.0.0.1:8000: "
                   "the quick start's stand-in upstream; the printed config names each "
                   "tier's upstream)")
    e.add_argument("--sidecar-http", default="127.0.0.1:8082",
                   help="the sidecar's HTTP ext_authz HOST:PORT (--mode http-authz)")
    e.add_argument("--sidecar-token-file", metavar="FILE",
                   help="Envoy reads this token (the file of kt serve --grpc-token-file) and "
                   "sends `authorization: Bearer <token>` on every call to the sidecar: "
                   "ext_authz (gRPC and HTTP), RLS, ext_proc, the usage access log")
    e.add_argument("--sidecar-tls-cert", metavar="PEM",
                   help="Envoy's client certificate for mTLS to the sidecar's gRPC port "
                   "(kt serve --grpc-client-ca must have signed it)")
    e.add_argument("--sidecar-tls-key", metavar="PEM", help="its private key")
    e.add_argument("--sidecar-ca", metavar="PEM",
                   help="TLS to the sidecar's gRPC port: the CA that signed the sidecar's "
                   "certificate (kt serve --grpc-tls-cert)")
    e.add_argument("--sidecar-sni", metavar="NAME",
                   help="the name checked in the sidecar's certificate, sent as SNI (default: "
                   "the --sidecar host; its IP address when it is one)")
    e.add_argument("--mode", choices=["authz", "http-authz", "rls"], default="authz")
    e.add_argument("--failure-mode", choices=["allow", "deny"], default="deny",
                   help="what Envoy does when the sidecar cannot answer")
    e.add_argument("--usage", choices=["als", "ext_proc", "none"], default="als",
                   help="how actual usage reaches the sidecar (authz, http-authz): Envoy's Lua "
                   "filter and gRPC access log (default), ext_proc per request, or not at all "
                   "(docs/usage.md)")
    e.add_argument("--pass-path", action="append", default=[], metavar="METHOD:/PATH",
                   help="also route this endpoint to the provider (repeatable; exact path, "
                   "e.g. GET:/v1/models), decided and charged by the sidecar like any "
                   "request. Only the metered API is routed otherwise (POST /v1/chat/"
                   "completions, /v1/completions, /v1/responses, /v1/embeddings, "
                   "/v1/messages); anything else is answered 404 by Envoy")
    e.add_argument("--jwt-issuer", metavar="ISS", help="validate a JWT from this issuer "
                   "first (Envoy's jwt_authn; the policy's tenant.metadata reads its claims)")
    e.add_argument("--jwt-jwks-file", metavar="FILE", help="the issuer's public keys (JWKS)")
    e.add_argument("--jwt-audience", action="append", default=[], metavar="AUD",
                   help="an accepted audience (repeatable; default: any)")
    e.set_defaults(func=_envoy_config)
    pl = sub.add_parser("plan", help="sidecar and Redis cores for a request rate, from a "
                        "bench result measured on your hardware")
    pl.add_argument("--rps", type=float, required=True, help="peak requests per second")
    pl.add_argument("--transport", choices=["http", "grpc"], default="http")
    pl.add_argument("--profile", default="chat_short", help="workload profile of the result")
    pl.add_argument("--headroom", type=float, default=1.5)
    pl.add_argument("--results", default=None,
                    help="a bench/run.py result (JSON); default: the reference result shipped "
                    "with the package (measured on the machine it names)")
    pl.set_defaults(func=_plan)

    cap = sub.add_parser("capacity", help="capacity planning (docs/providers.md)")
    capsub = cap.add_subparsers(dest="capacity_command", required=True)
    ce = capsub.add_parser("estimate", help="tokens per day and per peak minute, RPM/TPM "
                           "against each provider's limits, event storage, sidecar and Redis "
                           "cores")
    ce.add_argument("--requests-per-day", type=int, required=True)
    ce.add_argument("--avg-input-tokens", type=int, required=True)
    ce.add_argument("--avg-output-tokens", type=int, required=True)
    ce.add_argument("--peak-multiplier", type=float, default=3.0,
                    help="the peak minute over the average minute (default 3)")
    ce.add_argument("--model", help="with --config: the providers serving this model")
    ce.add_argument("--provider", action="append", default=[], metavar="ID|ID=RPM:TPM",
                    help="a provider of --config, or one given by its limits (repeatable)")
    ce.add_argument("--config", help="policy YAML whose providers' limits to check")
    ce.add_argument("--results", default=None, help="a bench/run.py result for the cores "
                    "(default: the reference result shipped with the package)")
    ce.set_defaults(func=_capacity_estimate)

    u = sub.add_parser("spend", help="actual tokens and USD per tenant, model and period, "
                       "from a running sidecar (kept by the backend: every replica, every "
                       "restart)")
    _admin_client_args(u)
    u.add_argument("--since", metavar="YYYY-MM-DD", help="first UTC day (default: all kept)")
    u.add_argument("--until", metavar="YYYY-MM-DD", help="last UTC day, included")
    u.add_argument("--period", choices=["day", "month", "total"], default=None,
                   help="one row per tenant, model and day/month (default: total)")
    # the sidecar checks the key (/v1/spend?by=, sidecar/ledger/spend.py GROUP_KEYS): a
    # key it gains needs no change here
    u.add_argument("--by", metavar="KEY", default=None,
                   help="one row per tenant, model, user or tag (end users and tags: "
                        "docs/budgets.md, Attribution) instead of per tenant and model")
    u.add_argument("--tenant", default=None, help="that tenant's spend only (e.g. with "
                   "--by user: its own end users)")
    u.set_defaults(func=_spend)

    st = sub.add_parser("status", help="one screen from a running sidecar's admin port: "
                        "readiness, policy, provider quota in use, queue, failure-mode "
                        "decisions in the last minute, top tenants by spend today "
                        "(exit 3 when not ready)")
    _admin_client_args(st)
    st.set_defaults(func=_status)

    from sidecar.ledger.cli import register as register_events  # kt events stats|migrate
    from sidecar.tenants_cli import register as register_tenants  # kt tenants ...

    register_tenants(sub)
    register_events(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        # `kt serve` stops cleanly on SIGINT or SIGTERM at any moment: both are held until
        # the sidecar (or the workers' supervisor) has its own handler in place
        with stop_signals.held():
            args = build_parser().parse_args(argv)
            if args.func is not _serve:
                stop_signals.release()  # any other command: Ctrl-C interrupts it
            logging.basicConfig(level=getattr(args, "log_level", "INFO"),
                                format="%(asctime)s %(levelname)s %(name)s: %(message)s")
            code = args.func(args)
        sys.stdout.flush()  # here, where a reader that left is caught, not at exit
        return code
    except KeyboardInterrupt:  # a command other than serve, interrupted: one line
        print("kt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `kt plan ... | head`: the reader left before the output ended. No traceback; the
        # rest of the output goes nowhere (Python's own advice for SIGPIPE), exit 1
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
