"""An Envoy v3 bootstrap wired to the sidecar (`kt envoy-config`). Pure: options in, YAML out.

Two ways to call the sidecar:
- ``authz`` (default): ext_authz over gRPC decides (allow / downgrade / deny with our
  status, headers and body), with ``clear_route_cache`` so a downgrade's ``x-kt-tier``
  re-selects the route; then ext_proc rewrites a downgraded body's ``model`` and reads
  actual usage from the response for reconciliation (docs/usage.md).
- ``rls``: Envoy's rate-limit filter; the tenant (and model) go as descriptor entries,
  the token estimate as ``hits_addend``. The rate-limit filter cannot re-select the
  route after the decision (it has no ``clear_route_cache``; checked on Envoy 1.40: an
  ``x-kt-tier: compact`` added by the RLS still reaches the default tier's cluster), so
  in this mode a downgrade arrives at the upstream as ``x-kt-tier`` / ``x-kt-model``
  headers and dynamic metadata only, and the upstream (or a later filter) must act on
  it: use ``authz`` mode when Envoy itself must route the compact tier to its own cluster.

Routes: only POST to the metered endpoints (and `pass_endpoints`) reach an upstream; every
other method and path is Envoy's own 404 on a route with every filter off
(sidecar/endpoints.py). Header names with underscores are dropped, and a client's
Accept-Encoding is removed toward the provider (the usage filter reads the reply).

Upstreams (the providers a tier's requests go to) are `Upstream` values: an IP address
becomes a STATIC cluster, a hostname a LOGICAL_DNS one (one address at a time, re-resolved:
what Envoy recommends for a large web service behind DNS, such as a provider's API); TLS
with SNI and the server's name checked against a CA bundle; the provider's API key read
by Envoy from a file and injected by an upstream credential-injector filter (it never
passes through the policy or the sidecar). Several upstreams in one tier are chosen by
weight within a priority group, and a retry (on 429, 5xx, reset or connect failure, within
a retry budget) goes to the next priority group: Envoy's priority-group cluster specifier.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Literal, NamedTuple, Sequence, Union

import yaml

from sidecar import contract, endpoints
from sidecar.address import AddressError, check_host, check_port, is_ip, split_host_port
from sidecar.auth import host_of, is_loopback_host
from sidecar.policy.load import CompiledPolicy
from sidecar.transports.http_authz import IDLE_TIMEOUT_S as SIDECAR_HTTP_IDLE_TIMEOUT_S

TYPE = "type.googleapis.com/"
# headers some web frameworks read as the request's method (Rails, Express's
# method-override, Google's APIs, ASP.NET): removed at the edge (docs/security.md)
METHOD_OVERRIDE_HEADERS = ("x-http-method-override", "x-http-method", "x-method-override")
PROVIDER_HEADERS = (contract.H_PROVIDER, contract.H_REASON)


# Debian/Ubuntu's bundle of public CAs: the envoyproxy/envoy image (Ubuntu) carries it.
DEFAULT_CA_FILE = "/etc/ssl/certs/ca-certificates.crt"
_HEADER = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class UpstreamError(AddressError):
    """An address or upstream spec that cannot be used; the message says why."""


@dataclass(frozen=True)
class Upstream:
    """One provider endpoint (an OpenAI-compatible API) that a tier's requests can go to.

    The issue-13 `providers:` section maps onto this one to one (host, port, tls, weight)."""
    host: str
    port: int
    tls: bool = False
    name: str = ""  # names its cluster within the tier; default: its position
    weight: int = 1  # share among the upstreams of the same priority
    priority: int = 0  # 0 is tried first; a retry goes to the next priority present
    sni: str = ""  # TLS server name (and the name checked in its certificate); default: host
    ca_file: str = DEFAULT_CA_FILE  # CAs that sign the provider's certificate
    api_key_file: str = ""  # Envoy reads the provider's key here and injects it
    api_key_header: str = "authorization"  # "Bearer <key>"; another header gets the raw key

    @property
    def is_ip(self) -> bool:
        return is_ip(self.host)

    @property
    def host_header(self) -> str:
        default = 443 if self.tls else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"

    def describe(self) -> str:
        scheme = "https" if self.tls else "http"
        extra = "".join(f",{k}={v}" for k, v in (
            ("weight", self.weight if self.weight != 1 else None),
            ("priority", self.priority or None),
            ("key-file", self.api_key_file or None)) if v is not None)
        return f"{scheme}://{self.host_header}{extra}"


_OPTIONS = {"weight", "priority", "name", "sni", "ca", "key-file", "key-header"}


def parse_upstream(spec: str, what: str = "upstream") -> Upstream:
    """`[http://|https://]HOST[:PORT][,weight=N][,priority=N][,name=ID][,sni=NAME][,ca=FILE]
    [,key-file=FILE][,key-header=HEADER]`. Without a scheme, port 443 means TLS."""
    first, *opts = spec.split(",")
    scheme, sep, rest = first.partition("://")
    if not sep:
        scheme, rest = "", first
    if scheme not in ("", "http", "https"):
        raise UpstreamError(f"{what} {spec!r}: the scheme must be http:// or https://")
    rest = rest.rstrip("/")
    if "/" in rest:
        raise UpstreamError(f"{what} {spec!r}: a path is not allowed (Envoy forwards the "
                            "client's path as it is)")
    host, port_text = split_host_port(rest, what)
    if not host or (port_text is None and not scheme):
        raise UpstreamError(f"{what} {spec!r}: expected HOST:PORT or https://HOST[:PORT]")
    check_host(host, f"{what} {spec!r}")
    port = (check_port(port_text, spec, what) if port_text is not None
            else 443 if scheme == "https" else 80)
    kw: dict = {"host": host, "port": port,
                "tls": scheme == "https" or (scheme == "" and port == 443)}
    for opt in opts:
        key, eq, value = opt.partition("=")
        key = key.strip()
        if not eq or key not in _OPTIONS:
            raise UpstreamError(f"{what} {spec!r}: unknown option {opt!r} (known: "
                                f"{', '.join(sorted(_OPTIONS))})")
        if key in ("weight", "priority"):
            if not value.isdigit() or not (1 if key == "weight" else 0) <= int(value) <= 1000:
                raise UpstreamError(f"{what} {spec!r}: {key} must be an integer "
                                    f"{'1' if key == 'weight' else '0'}..1000")
            kw[key] = int(value)
        elif key == "name":
            if not _NAME.match(value):
                raise UpstreamError(f"{what} {spec!r}: name must be lowercase letters, digits, "
                                    "'-' or '_'")
            kw["name"] = value
        elif key == "sni":
            check_host(value, f"{what} {spec!r} sni")
            kw["sni"] = value
        elif key == "ca":
            kw["ca_file"] = value
        elif key == "key-file":
            kw["api_key_file"] = value
        elif key == "key-header":
            if not _HEADER.match(value.lower()):
                raise UpstreamError(f"{what} {spec!r}: key-header {value!r} is not a header name")
            kw["api_key_header"] = value.lower()
    u = Upstream(**kw)
    if (u.sni or u.ca_file != DEFAULT_CA_FILE) and not u.tls:
        raise UpstreamError(f"{what} {spec!r}: sni and ca apply to https:// upstreams only")
    return u


class TierRoute(NamedTuple):
    name: str
    model: str
    # HOST:PORT or an upstream spec (parse_upstream), or the tier's upstreams
    upstream: Union[str, Sequence[Upstream]]

    def upstreams(self) -> list[Upstream]:
        if isinstance(self.upstream, str):
            return [parse_upstream(self.upstream, f"tier {self.name!r} upstream")]
        ups = list(self.upstream)
        if not ups:
            raise UpstreamError(f"tier {self.name!r} has no upstream")
        names = [u.name or str(i) for i, u in enumerate(ups)]
        if len(set(names)) != len(names):
            raise UpstreamError(f"tier {self.name!r}: two upstreams share the name in {names}")
        return [u if u.name else replace(u, name=str(i)) for i, u in enumerate(ups)]


@dataclass(frozen=True)
class EnvoyOptions:
    listen_host: str = "127.0.0.1"
    listen_port: int = 10000
    admin_host: str = "127.0.0.1"
    admin_port: int = 9901
    sidecar_address: str = "127.0.0.1:8081"
    sidecar_http_address: str = "127.0.0.1:8082"  # `kt serve --http-authz` (http-authz mode)
    tiers: list[TierRoute] = field(default_factory=lambda: [
        TierRoute("default", "gpt-4o", "127.0.0.1:8000"),
        TierRoute("compact", "gpt-4o-mini", "127.0.0.1:8000")])
    mode: Literal["authz", "http-authz", "rls", "none"] = "authz"  # none: Envoy alone
    # what Envoy does when the sidecar cannot answer: "deny" answers 503 (ext_authz and
    # RLS `status_on_error`), "allow" lets the request through
    failure_mode: Literal["allow", "deny"] = "deny"
    # Envoy's own defaults: ext_authz 200 ms, RLS 20 ms. The sidecar answers in well under
    # a millisecond; these bound the damage of a stalled sidecar. RLS keeps Envoy's tight
    # 20 ms: a rate limiter on every request must fail fast (a 10 s limiter timeout turned a
    # Redis outage into second-long stalls, envoyproxy/ratelimit #462), and the Redis
    # backend's own 15 ms timeout sits under it so the sidecar's failure mode answers first.
    authz_timeout_s: float = 0.2
    rls_timeout_s: float = 0.02
    with_request_body: bool = True  # the sidecar reads model / max_tokens from the body
    max_request_bytes: int = 65536
    # how actual usage reaches the sidecar (authz and http-authz modes; docs/usage.md):
    # "als": Envoy's Lua filter picks the usage out of the response and Envoy's gRPC access
    #   log delivers it in batches on one long-lived stream; ext_proc only rewrites the body
    #   of a downgraded request. "ext_proc": one ext_proc stream per request reads the
    #   response as it passes (and rewrites). "none": neither (no reconciliation, no rewrite)
    usage: Literal["als", "ext_proc", "none"] = "als"
    # als: how long Envoy holds access-log entries before sending a batch, and how many
    # bytes make it send at once (Envoy's defaults: 1 s, 16 KiB)
    usage_flush_s: float = 0.1
    usage_buffer_bytes: int = 65536
    tenant_header: str = "x-tenant-id"
    # rls mode: the rate-limit filter never sees the body, so a client that wants a
    # particular model's tier says so in this header (descriptor entry `model`, optional)
    # the client's model for the RLS `model` descriptor (the filter cannot read the body);
    # not x-kt-model, which is the sidecar's answer and stripped at the listener
    rls_model_header: str = "x-kt-requested-model"
    estimate_header: str = "x-kt-estimated-tokens"  # policy `estimate.header`; rls hits_addend
    # policy `estimate.trusted`: a filter of the operator's sets the estimate header; else
    # a client's own is removed at the edge (the sidecar ignores it too)
    estimate_trusted: bool = False
    # policy `attribution`: the end-user and tags headers (sidecar/attribution.py), under
    # the estimate's trust model: a client's own are removed at the edge unless a filter of
    # the operator's sets them (`trusted`); then the decision and the access log read them
    attribution_headers: tuple[str, ...] = ("x-kt-end-user", "x-kt-tags")
    attribution_trusted: bool = False
    # namespace of dynamic metadata to send to ext_authz (policy `tenant.metadata`)
    tenant_metadata_namespace: str = ""
    # Envoy's jwt_authn in front of the decision: the tenant then comes from a validated
    # token's claims (policy `tenant.metadata: "envoy.filters.http.jwt_authn:jwt_payload.org"`)
    # and a request without a valid token is refused (401) before it costs anything
    jwt_issuer: str = ""
    jwt_jwks_file: str = ""  # the issuer's public keys (JWKS), a file Envoy reads
    jwt_audiences: tuple[str, ...] = ()
    upstream_timeout_s: float = 300.0  # LLM replies are slow; streams longer still
    # a provider across the internet: TCP and TLS handshake; the sidecar keeps 0.25 s
    upstream_connect_timeout_s: float = 5.0
    # providers close idle keep-alive connections (often after about a minute): Envoy
    # closes its own first, so a request never goes out on a connection being closed
    upstream_idle_timeout_s: float = 50.0
    # concurrent requests per provider cluster (HTTP/1.1: one connection each). Envoy's
    # default, 1024, is low for a gateway whose streams last a minute
    upstream_max_requests: int = 10000
    # retries never add more than this share of the cluster's active requests (and never
    # fewer than 3 at once): a failing provider cannot double the load on the others
    retry_budget_percent: float = 20.0
    # policy `providers:` with a host (docs/providers.md): one cluster each, `name` = the
    # provider's id; the sidecar's x-kt-provider picks it (the tier routes stay the
    # fallback for a decision that names none: Envoy's own failure mode let it through)
    providers: list[Upstream] = field(default_factory=list)
    # Envoy's credential for a sidecar that listens beyond loopback (`kt serve` refuses such
    # a bind without one; docs/security.md). A token file: Envoy reads it at start (a
    # mounted Secret, the same file as `kt serve --grpc-token-file`) and an upstream
    # credential-injector filter of the sidecar's clusters sets `authorization: Bearer
    # <token>` on every call: ext_authz (gRPC and HTTP), RLS, ext_proc, the usage access
    # log. (grpc_service.initial_metadata would do the same for gRPC, but holds the token
    # inline: the whole Envoy config would become a secret.)
    sidecar_token_file: str = ""
    # mTLS to the sidecar's gRPC port (`kt serve --grpc-tls-cert/--grpc-tls-key/
    # --grpc-client-ca`): Envoy's client certificate and key, the CA that signed the
    # sidecar's certificate, and the name checked in it (and sent as SNI; default: the
    # --sidecar host when it is a name, else its IP address is checked)
    sidecar_tls_cert: str = ""
    sidecar_tls_key: str = ""
    sidecar_ca: str = ""
    sidecar_sni: str = ""
    # endpoints passed to the provider besides the metered ones (`kt envoy-config
    # --pass-path METHOD:/PATH`): still decided and charged by the sidecar like any request;
    # every other method and path is answered 404 by Envoy (sidecar/endpoints.py)
    pass_endpoints: tuple[endpoints.Endpoint, ...] = ()
    # places of the sidecar's admission queue (policy queue.max_size; `kt envoy-config
    # --config` sets it): checks parked there stay in flight to the sidecar, so the circuit
    # breaker of its clusters allows them on top of those being decided
    sidecar_queue_places: int = 0
    # benchmarking: answer 200 from Envoy itself instead of routing to the tiers, and read
    # the request body first (a direct response to an unread POST body closes the
    # connection, which would measure reconnects, not Envoy)
    direct_response: bool = False


def _addr(hostport: str) -> dict:
    host, _, port = hostport.rpartition(":")
    return {"socket_address": {"address": host.strip("[]"), "port_value": int(port)}}


SIDECAR_TOKEN_SECRET = "kt_sidecar_token"
# requests in flight to the sidecar Envoy allows beside the queue's (Envoy's own default
# for any cluster, 1,024): past them Envoy answers by its failure mode without asking
SIDECAR_DECIDING_MAX = 1024


def sidecar_max_requests(queue_places: int) -> int:
    """The circuit breaker of the sidecar's clusters: the queue's places on top of the
    checks being decided (the printed config; `kt check-config` warns against less)."""
    return SIDECAR_DECIDING_MAX + queue_places


def policy_warnings(p: CompiledPolicy) -> list[str]:
    """What `kt check-config` warns about: valid, but likely to fail under load."""
    out: list[str] = []
    q = p.queue
    if q is not None and q.max_size > SIDECAR_DECIDING_MAX // 2:
        out.append(
            f"queue.max_size {q.max_size}: up to {q.max_size} checks wait in each sidecar "
            "process (each `kt serve` worker has its own queue), on top of those being "
            f"decided. Envoy's default circuit breaker ({SIDECAR_DECIDING_MAX} requests in "
            "flight to a cluster) would overflow, and Envoy's failure mode would answer the "
            "checks past it without asking the sidecar: use the config of `kt envoy-config "
            f"--config` with this policy (its sidecar clusters allow "
            f"{sidecar_max_requests(q.max_size)}), and with W workers behind one Envoy raise "
            f"their max_requests to W x {q.max_size} + {SIDECAR_DECIDING_MAX}")
    return out


def _sidecar_cluster(name: str, hostport: str, http2: bool, o: EnvoyOptions,
                     idle_timeout_s: float = 0.0) -> dict:
    """The sidecar's gRPC port (http2) or its HTTP fast path, with Envoy's credential."""
    address = _addr(hostport)
    host = address["socket_address"]["address"]
    c: dict = {
        "name": name,
        # the sidecar by name (another container, a Service): every address it resolves to
        "type": "STATIC" if is_ip(host) else "STRICT_DNS",
        "connect_timeout": "0.25s",
        "load_assignment": {"cluster_name": name, "endpoints": [
            {"lb_endpoints": [{"endpoint": {"address": address}}]}]},
    }
    # Envoy's default breaker (1,024 requests) left unset, a full admission queue made
    # every check on top of it overflow: answered by Envoy's failure mode, never asked
    limit = sidecar_max_requests(o.sidecar_queue_places)
    c["circuit_breakers"] = {"thresholds": [{
        "priority": "DEFAULT", "max_requests": limit, "max_pending_requests": limit}]}
    opts: dict = {
        "@type": TYPE + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {  # gRPC needs HTTP/2 to the sidecar
            "http2_protocol_options" if http2 else "http_protocol_options": {}}}
    if idle_timeout_s:
        opts["common_http_protocol_options"] = {"idle_timeout": f"{idle_timeout_s:g}s"}
    if o.sidecar_token_file:
        # every request on this cluster (a gRPC call is one) carries the token, read from
        # its file by Envoy; `overwrite`: a client's own Authorization, which HTTP ext_authz
        # forwards by default, never reaches the sidecar as a credential
        opts["http_filters"] = [_credential_injector(SIDECAR_TOKEN_SECRET, "authorization",
                                                     overwrite=True), _upstream_codec()]
    c["typed_extension_protocol_options"] = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": opts}
    if http2 and o.sidecar_ca:  # kt serve's TLS is on the gRPC port only
        name_checked = o.sidecar_sni or ("" if is_ip(host) else host)
        san = ({"san_type": "DNS", "matcher": {"exact": name_checked}} if name_checked
               else {"san_type": "IP_ADDRESS", "matcher": {"exact": host}})
        common: dict = {
            "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
            "alpn_protocols": ["h2"],  # gRPC servers expect HTTP/2 negotiated by ALPN
            "validation_context": {"trusted_ca": {"filename": o.sidecar_ca},
                                   "match_typed_subject_alt_names": [san]}}
        if o.sidecar_tls_cert:
            common["tls_certificates"] = [{
                "certificate_chain": {"filename": o.sidecar_tls_cert},
                "private_key": {"filename": o.sidecar_tls_key}}]
        tls: dict = {
            "@type": TYPE + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": common}
        if name_checked:
            tls["sni"] = name_checked
        c["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": tls}
    return c


def _upstream_codec() -> dict:
    """The last upstream filter (a new dict each time: YAML would print a shared one as an
    anchor and aliases)."""
    return {"name": "envoy.filters.http.upstream_codec", "typed_config": {
        "@type": TYPE + "envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"}}


def _credential_injector(secret: str, header: str, overwrite: bool) -> dict:
    """An upstream filter setting ``header`` from a generic secret (a file Envoy reads):
    "Bearer <secret>" for authorization, the raw secret for any other header."""
    return {"name": "envoy.filters.http.credential_injector", "typed_config": {
        "@type": TYPE + "envoy.extensions.filters.http.credential_injector.v3."
                        "CredentialInjector",
        "overwrite": overwrite,
        "credential": {"name": "envoy.http.injected_credentials.generic",
                       "typed_config": {
                           "@type": TYPE + "envoy.extensions.http.injected_credentials."
                                           "generic.v3.Generic",
                           "credential": {"name": secret},
                           "header": header,
                           "header_value_prefix": "Bearer " if header == "authorization"
                           else ""}}}}


def _tier_clusters(tier: TierRoute) -> list[tuple[str, Upstream]]:
    """Cluster name and upstream of each of a tier's upstreams (tier_<tier> when alone)."""
    ups = tier.upstreams()
    if len(ups) == 1:
        return [(f"tier_{tier.name}", ups[0])]
    return [(f"tier_{tier.name}_{u.name}", u) for u in ups]


def _upstream_cluster(name: str, u: Upstream, o: EnvoyOptions) -> dict:
    endpoint: dict = {"address": {"socket_address": {"address": u.host, "port_value": u.port}}}
    c: dict = {"name": name, "connect_timeout": _seconds(o.upstream_connect_timeout_s)}
    if u.is_ip:
        c["type"] = "STATIC"
    else:
        # one address at a time, re-resolved in the background (a provider's API sits
        # behind DNS that rotates many addresses); IPv4 first: many clusters have no IPv6
        c.update(type="LOGICAL_DNS", dns_lookup_family="V4_PREFERRED")
        endpoint["hostname"] = u.host_header  # the Host header auto_host_rewrite sets
    c["load_assignment"] = {"cluster_name": name,
                            "endpoints": [{"lb_endpoints": [{"endpoint": endpoint}]}]}
    c["circuit_breakers"] = {"thresholds": [{
        "priority": "DEFAULT", "max_connections": o.upstream_max_requests,
        "max_pending_requests": o.upstream_max_requests,
        "max_requests": o.upstream_max_requests,
        "retry_budget": {"budget_percent": {"value": o.retry_budget_percent},
                         "min_retry_concurrency": 3}}]}
    if u.tls:
        server_name = u.sni or (u.host if not u.is_ip else "")
        san = ({"san_type": "DNS", "matcher": {"exact": server_name}} if server_name
               else {"san_type": "IP_ADDRESS", "matcher": {"exact": u.host}})
        tls: dict = {
            "@type": TYPE + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": {
                "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
                "validation_context": {"trusted_ca": {"filename": u.ca_file},
                                       "match_typed_subject_alt_names": [san]}}}
        if server_name:
            tls["sni"] = server_name
        c["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": tls}
    opts: dict = {
        "@type": TYPE + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http_protocol_options": {}},
        "common_http_protocol_options": {"idle_timeout": f"{o.upstream_idle_timeout_s:g}s"}}
    if u.api_key_file:
        # An upstream filter of this cluster only: each provider gets its own key, read by
        # Envoy from the file at start (a Kubernetes Secret), replacing any the client sent
        opts["http_filters"] = [
            _credential_injector(_secret_name(name), u.api_key_header, overwrite=True),
            _upstream_codec()]
    c["typed_extension_protocol_options"] = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": opts}
    return c


def _provider_cluster(u: Upstream) -> str:
    return f"provider_{u.name}"


def _secret_name(cluster: str) -> str:
    return f"{cluster}_api_key"


def _secrets(o: EnvoyOptions) -> list[dict]:
    named = [(name, u) for tier in o.tiers for name, u in _tier_clusters(tier)]
    named += [(_provider_cluster(u), u) for u in o.providers]
    out = [{"name": _secret_name(name), "generic_secret": {"secret": {"filename": u.api_key_file}}}
           for name, u in named if u.api_key_file]
    if o.sidecar_token_file:
        out.append({"name": SIDECAR_TOKEN_SECRET,
                    "generic_secret": {"secret": {"filename": o.sidecar_token_file}}})
    return out


def _tier_route(tier: TierRoute, timeout: str) -> dict:
    clusters = _tier_clusters(tier)
    route: dict
    if len(clusters) == 1:
        route = {"cluster": clusters[0][0], "timeout": timeout,
                 # nothing reached the provider: safe to try once more
                 "retry_policy": {"retry_on": "connect-failure,refused-stream",
                                  "num_retries": 1}}
    else:
        # one group per priority (weighted within it); a retry moves to the next group
        # (after the last, back to the first): weighted routing plus failover
        groups: dict[int, list[dict]] = {}
        for name, u in clusters:
            groups.setdefault(u.priority, []).append({"cluster_name": name, "weight": u.weight})
        route = {
            "inline_cluster_specifier_plugin": {"extension": {
                "name": "envoy.router.cluster_specifier_plugin.priority_group",
                "typed_config": {
                    "@type": TYPE + "envoy.extensions.router.cluster_specifiers.priority_group."
                                    "v3.PriorityGroupClusterSpecifier",
                    "priority_groups": [{"name": f"priority_{p}", "clusters": groups[p]}
                                        for p in sorted(groups)]}}},
            "timeout": timeout,
            # A provider's 429 (its own quota), 5xx, a reset or a refused connection: try
            # the next group. Only before the response started: a stream is never replayed.
            "retry_policy": {
                "retry_on": "connect-failure,refused-stream,reset,5xx,retriable-status-codes",
                "retriable_status_codes": [429],
                "num_retries": max(1, len(groups) - 1),
                "refresh_cluster_on_retry": True}}
    if any(not u.is_ip for _, u in clusters):
        # the provider's own name, not the gateway's, in Host (and so in TLS SNI checks)
        route["auto_host_rewrite"] = True
    return route


def _seconds(s: float) -> str:
    return f"{s:.3f}s"


def _missing_tenant_body() -> str:
    return contract.error_body(
        "No tenant: the request carries no tenant header.", "invalid_request_error",
        "missing_tenant").decode()


def _json_400(match_headers: list[dict], body: str) -> dict:
    return {"match": {"prefix": "/", "headers": match_headers},
            "direct_response": {"status": 400, "body": {"inline_string": body}},
            "response_headers_to_add": [{"header": {"key": "content-type",
                                                    "value": "application/json"}}]}


def _routes(o: EnvoyOptions) -> list[dict]:
    timeout = _seconds(o.upstream_timeout_s)
    routes: list[dict] = []
    if o.mode == "rls":
        # Envoy makes no RLS call when the descriptor cannot be built, which would let
        # such a request through unlimited: refuse those here with the contract's answer.
        # (1) no tenant header;
        routes.append(_json_400([{"name": o.tenant_header, "present_match": False}],
                                _missing_tenant_body()))
        # (2) an estimate header that hits_addend cannot parse (not a number, or above
        # Envoy's and the sidecar's 1e9 cap): "a malformed estimate is a 400, never a guess"
        routes.append(_json_400(
            [{"name": o.estimate_header, "string_match": {"safe_regex": {"regex": "[0-9]{1,9}"}},
              "invert_match": True}],
            contract.error_body(f"header {o.estimate_header} must be an integer between 0 and "
                                "999999999", "invalid_request_error", "invalid_request").decode()))
    if o.direct_response:
        routes.append({"match": {"prefix": "/"},
                       "direct_response": {"status": 200, "body": {"inline_string": "{}"}}})
        return routes
    forwarded: list[tuple[list[dict], dict]] = []  # (header matches, route action)
    for u in o.providers:
        route: dict = {"cluster": _provider_cluster(u), "timeout": timeout,
                       # nothing reached the provider: safe to try once more. Never another
                       # provider: the sidecar charged this one's quota
                       "retry_policy": {"retry_on": "connect-failure,refused-stream",
                                        "num_retries": 1}}
        if not u.is_ip:
            route["auto_host_rewrite"] = True
        forwarded.append(([{"name": contract.H_PROVIDER, "string_match": {"exact": u.name}}],
                          route))
    for tier in o.tiers[1:]:
        forwarded.append(([{"name": contract.H_TIER, "string_match": {"exact": tier.name}}],
                          _tier_route(tier, timeout)))
    forwarded.append(([], _tier_route(o.tiers[0], timeout)))
    routed = endpoints.routed(o.pass_endpoints)
    for headers, action in forwarded:
        for e in routed:
            routes.append({
                # the endpoint's name: the access log and ext_proc report it (the usage
                # event's `endpoint`, sidecar/upstream_sli.py), never the client's path
                "name": endpoints.route_name(e),
                # exact, the query string removed; no YAML anchors: one dict per route
                "match": {"path": e.path,
                          "headers": [*copy.deepcopy(headers),
                                      {"name": ":method", "string_match": {"exact": e.method}}]},
                "route": copy.deepcopy(action),
                # the reply must stay readable for its usage: a client's Accept-Encoding
                # would have the provider compress it, and the usage filter reads nothing
                "request_headers_to_remove": ["accept-encoding"]})
    # every other method and path: Envoy's own 404, with every filter off (no decision is
    # asked, no credential injected, nothing reaches a provider)
    routes.append({
        "match": {"prefix": "/"},
        "direct_response": {"status": 404, "body": {
            "inline_string": endpoints.not_routed_body(routed)}},
        "response_headers_to_add": [{"header": {"key": "content-type",
                                                "value": "application/json"}}],
        "typed_per_filter_config": {
            name: {"@type": TYPE + "envoy.config.route.v3.FilterConfig", "disabled": True}
            for name in _filter_names(o)}})
    return routes


def _rate_limits(o: EnvoyOptions) -> list[dict]:
    # One descriptor: (tenant, [model]). Given to the filter itself, not to the route
    # table: Envoy 1.40 accepts `hits_addend` on a route's or virtual host's rate_limits
    # but never sends it; only the filter's own `rate_limits` evaluate it, and they send
    # it as the descriptor's `hits_addend` (not the request-level field).
    return [{
        "actions": [
            {"request_headers": {"header_name": o.tenant_header, "descriptor_key": "tenant"}},
            # without skip_if_absent a request with no model header would get no
            # descriptor at all, i.e. no RLS call and no limit
            {"request_headers": {"header_name": o.rls_model_header, "descriptor_key": "model",
                                 "skip_if_absent": True}},
        ],
        # the request's token estimate is the number of hits. If this format yields no
        # number Envoy sends no descriptor at all: see the early header mutation (absent
        # header) and the 400 route (malformed header) that make that impossible
        "hits_addend": {"format": f"%REQ({o.estimate_header})%"},
    }]


def _exact(*names: str) -> list[dict]:
    return [{"exact": n} for n in names]


def _http_authz(o: EnvoyOptions) -> dict:
    """ext_authz over HTTP to `kt serve --http-authz`: the same contract, header by header."""
    # content-encoding: a compressed body is refused by the decision (sidecar/estimate.py)
    allowed = [o.tenant_header, o.estimate_header, "x-request-id", "content-type",
               "content-encoding", *_trusted_attribution(o)]
    client = [{"prefix": "x-ratelimit-"}, {"prefix": "x-kt-budget-"}]
    cfg: dict = {
        "@type": TYPE + "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
        "transport_api_version": "V3",
        "http_service": {
            "server_uri": {"uri": f"http://{o.sidecar_http_address}",
                           "cluster": "kt_sidecar_http", "timeout": _seconds(o.authz_timeout_s)},
            "authorization_response": {
                "allowed_upstream_headers": {"patterns": _exact(*contract.UPSTREAM_HEADERS)},
                "allowed_client_headers": {"patterns": _exact(
                    contract.H_RETRY_AFTER, contract.H_CONTENT_TYPE, contract.H_REASON) + client},
                "allowed_client_headers_on_success": {
                    "patterns": client + _exact(contract.H_REASON)},
            },
        },
        # the filter-level list (http_service.authorization_request.allowed_headers is
        # deprecated since Envoy 1.32); Host, method, path and content-length go anyway
        "allowed_headers": {"patterns": _exact(*allowed)},
        "failure_mode_allow": o.failure_mode == "allow",
        "status_on_error": {"code": "ServiceUnavailable"},
        "clear_route_cache": True,
    }
    if o.with_request_body:
        cfg["with_request_body"] = {"max_request_bytes": o.max_request_bytes,
                                    "allow_partial_message": True}
    return cfg


USAGE_LOG_NAME = "kt_usage"


def _als_usage_filters(o: EnvoyOptions) -> list[dict]:
    """ext_proc for the body of a downgraded request only (a matcher skips the filter for
    every other request: no stream, no message). The Lua filter that leaves the response's
    usage in dynamic metadata for the access log comes before ext_authz (_usage_lua)."""
    rewrite = {
        "@type": TYPE + "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        "grpc_service": {"envoy_grpc": {"cluster_name": "kt_sidecar"},
                         "timeout": _seconds(o.authz_timeout_s),
                         "initial_metadata": [{"key": contract.H_EXT_PROC_ROLE, "value": "rewrite"}]},
        # a body that cannot be rewritten goes on as it is (the decision was made)
        "failure_mode_allow": True,
        "message_timeout": _seconds(o.authz_timeout_s),
        "processing_mode": {
            "request_header_mode": "SEND", "request_body_mode": "BUFFERED",
            "response_header_mode": "SKIP", "response_body_mode": "NONE",
            "request_trailer_mode": "SKIP", "response_trailer_mode": "SKIP"},
    }
    skip_unless_downgrade = {
        "matcher_list": {"matchers": [{
            "predicate": {"not_matcher": {"single_predicate": {
                "input": {"name": "decision", "typed_config": {
                    "@type": TYPE + "envoy.type.matcher.v3.HttpRequestHeaderMatchInput",
                    "header_name": contract.H_DECISION}},
                "value_match": {"exact": "downgrade"}}}},
            "on_match": {"action": {"name": "skip", "typed_config": {
                "@type": TYPE + "envoy.extensions.filters.common.matcher.action.v3.SkipFilter"}}},
        }]}}
    return [
        {"name": "envoy.filters.http.ext_proc", "typed_config": {
            "@type": TYPE + "envoy.extensions.common.matching.v3.ExtensionWithMatcher",
            "extension_config": {"name": "envoy.filters.http.ext_proc", "typed_config": rewrite},
            "xds_matcher": skip_unless_downgrade}},
    ]


def usage_filter_source() -> str:
    """envoy/usage.lua from the source tree when running from a checkout, else the copy
    packaged in sidecar/envoy/ (setup.py)."""
    repo = Path(__file__).resolve().parents[1] / "envoy" / "usage.lua"
    if repo.is_file():
        return repo.read_text()
    return resources.files("sidecar").joinpath("envoy", "usage.lua").read_text()


def _usage_lua(request_only: bool = False, decided_bytes: int = 65536) -> dict:
    """Envoy's Lua filter running envoy/usage.lua: on requests, a streamed chat
    completion asks for its usage; on responses (unless ``request_only``: ext_proc reads
    them) the usage is left in dynamic metadata.

    It goes before ext_authz: it buffers a streamed chat request's body, and after
    ext_authz has paused the request (its buffer full, the client's reads disabled at the
    high watermark) a buffering filter waits for an end of body that never comes (seen on
    Envoy 1.40 with a 2 MB chunked body: no answer until the idle timeout). First in line,
    a body over the buffer limit is Envoy's 413 at once."""
    source = usage_filter_source()
    # a body larger than what the decision reads whole is read by the filter for the bound
    # (n, max_tokens... beyond the first part: sidecar/settlement/bound.py, with_body_seen)
    line = "local DECIDED_BYTES = 65536\n"
    assert line in source, "envoy/usage.lua: DECIDED_BYTES not found"
    source = source.replace(line, f"local DECIDED_BYTES = {decided_bytes}\n", 1)
    if request_only:  # the Lua filter skips a direction whose function is not defined
        source += "\nenvoy_on_response = nil\n"
    return {"name": "envoy.filters.http.lua", "typed_config": {
        "@type": TYPE + "envoy.extensions.filters.http.lua.v3.Lua",
        "default_source_code": {"inline_string": source}}}


def _trusted_attribution(o: EnvoyOptions) -> list[str]:
    """The attribution headers the sidecar reads: none unless a trusted filter sets them."""
    return list(o.attribution_headers) if o.attribution_trusted else []


def _usage_access_log(o: EnvoyOptions) -> dict:
    """Envoy's gRPC access log to the sidecar: one entry per admitted request (the decision
    header is on the request only when ext_authz admitted it), with the usage the Lua filter
    left in dynamic metadata, the status and the response flags, in batches. Envoy's
    logger always sends the route's name, body sizes and upstream timings (the SLIs,
    sidecar/upstream_sli.py): nothing to ask for."""
    return {
        "name": "envoy.access_loggers.http_grpc",
        "filter": {"header_filter": {"header": {"name": contract.H_DECISION,
                                                "present_match": True}}},
        "typed_config": {
            "@type": TYPE + "envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
            "common_config": {
                "log_name": USAGE_LOG_NAME,
                "grpc_service": {"envoy_grpc": {"cluster_name": "kt_sidecar"}},
                "transport_api_version": "V3",
                "buffer_flush_interval": _seconds(o.usage_flush_s),
                "buffer_size_bytes": o.usage_buffer_bytes,
            },
            # the model the decision routed to (the SLIs' model label of a reply without
            # usage, sidecar/upstream_sli.py) and, with providers, which one answered
            # (kt_upstream_responses_total, the SLIs' provider label)
            # and whom below the tenant the request is for, when a trusted filter says so
            # (usage settled without a reservation: sidecar/attribution.py)
            "additional_request_headers_to_log": [
                contract.H_TENANT, contract.H_RESERVATION, contract.H_MODEL] + (
                [contract.H_PROVIDER] if o.providers else []) + _trusted_attribution(o),
        },
    }


JWT_NAMESPACE = "envoy.filters.http.jwt_authn"
JWT_PAYLOAD_KEY = "jwt_payload"  # the policy reads "envoy.filters.http.jwt_authn:jwt_payload.<claim>"


def _jwt_authn(o: EnvoyOptions) -> dict:
    provider: dict = {
        "issuer": o.jwt_issuer,
        "local_jwks": {"filename": o.jwt_jwks_file},
        "payload_in_metadata": JWT_PAYLOAD_KEY,
        # the gateway's own token stays at the gateway: the provider gets its API key instead
        "forward": False,
    }
    if o.jwt_audiences:
        provider["audiences"] = list(o.jwt_audiences)
    return {"name": JWT_NAMESPACE, "typed_config": {
        "@type": TYPE + "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
        "providers": {"gateway": provider},
        "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "gateway"}}]}}


def _filter_names(o: EnvoyOptions) -> list[str]:
    """The HTTP filters a route can turn off (all but the router)."""
    return [f["name"] for f in _filters(o) if f["name"] != "envoy.filters.http.router"]


def _filters(o: EnvoyOptions) -> list[dict]:
    sidecar = {"envoy_grpc": {"cluster_name": "kt_sidecar"}}
    filters: list[dict] = []
    if o.jwt_jwks_file:
        filters.append(_jwt_authn(o))
    if o.mode in ("authz", "http-authz") and o.usage != "none":
        # the decision reads a body whole up to ext_authz's max_request_bytes (nothing of it
        # in http-authz mode without with_request_body): the filter reads larger ones
        filters.append(_usage_lua(request_only=o.usage == "ext_proc",
                                  decided_bytes=o.max_request_bytes if o.with_request_body
                                  else 0))
    if o.mode == "http-authz":
        filters.append({"name": "envoy.filters.http.ext_authz", "typed_config": _http_authz(o)})
    if o.mode == "authz":
        authz: dict = {
            "@type": TYPE + "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
            "transport_api_version": "V3",
            "grpc_service": dict(sidecar, timeout=_seconds(o.authz_timeout_s)),
            "failure_mode_allow": o.failure_mode == "allow",
            "status_on_error": {"code": "ServiceUnavailable"},
            # the decision's x-kt-tier must re-select the route (downgrade → compact cluster)
            "clear_route_cache": True,
        }
        if o.tenant_metadata_namespace:  # the tenant from an authenticating filter
            authz["metadata_context_namespaces"] = [o.tenant_metadata_namespace]
        if o.with_request_body:
            authz["with_request_body"] = {"max_request_bytes": o.max_request_bytes,
                                          "allow_partial_message": True,
                                          "pack_as_bytes": True}
        filters.append({"name": "envoy.filters.http.ext_authz", "typed_config": authz})
    if o.mode in ("authz", "http-authz") and o.usage == "als":
        filters += _als_usage_filters(o)
    if o.mode in ("authz", "http-authz"):
        if o.usage == "ext_proc":
            filters.append({"name": "envoy.filters.http.ext_proc", "typed_config": {
                "@type": TYPE + "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
                "grpc_service": dict(sidecar, timeout=_seconds(o.authz_timeout_s)),
                # accounting never fails a request that ext_authz admitted
                "failure_mode_allow": True,
                "message_timeout": _seconds(o.authz_timeout_s),
                "processing_mode": {
                    "request_header_mode": "SEND", "request_body_mode": "BUFFERED",
                    "response_header_mode": "SEND",
                    # every chunk is answered at once: a stream is never held back
                    "response_body_mode": "STREAMED",
                    "request_trailer_mode": "SKIP", "response_trailer_mode": "SKIP"},
                # a request that needs no body rewrite tells Envoy to skip its body
                "allow_mode_override": True,
                # what the usage filter read in the whole request body (n, max_tokens...;
                # envoy/usage.lua), for the bound of a reply whose usage is unreadable
                "metadata_options": {"forwarding_namespaces": {
                    "untyped": [contract.USAGE_METADATA_NAMESPACE]}},
                # the route's name: the usage event's endpoint (sidecar/upstream_sli.py)
                "request_attributes": ["xds.route_name"],
            }})
    if o.mode == "rls":
        filters.append({"name": "envoy.filters.http.ratelimit", "typed_config": {
            "@type": TYPE + "envoy.extensions.filters.http.ratelimit.v3.RateLimit",
            "domain": "kt",
            # "both" (Envoy's default, spelled out): with "external", a request the
            # connection manager marks internal (x-envoy-internal: an app on loopback when
            # internal_address_config covers it, the usual pod-sidecar set-up) skips the
            # RLS call entirely: no limit, no budget (seen on Envoy 1.40)
            "request_type": "both",
            "timeout": _seconds(o.rls_timeout_s),
            "failure_mode_deny": o.failure_mode == "deny",
            # a sidecar that cannot answer is a 503, as in ext_authz mode (Envoy's own
            # default would be 500)
            "status_on_error": {"code": "ServiceUnavailable"},
            # the sidecar sends the OpenAI-style x-ratelimit-* itself; Envoy's draft-RFC
            # headers would contradict them
            "enable_x_ratelimit_headers": "OFF",
            "rate_limit_service": {"grpc_service": sidecar, "transport_api_version": "V3"},
            "rate_limits": _rate_limits(o),
        }})
    if o.direct_response:
        filters.append({"name": "envoy.filters.http.buffer", "typed_config": {
            "@type": TYPE + "envoy.extensions.filters.http.buffer.v3.Buffer",
            "max_request_bytes": o.max_request_bytes * 4}})
    filters.append({"name": "envoy.filters.http.router", "typed_config": {
        "@type": TYPE + "envoy.extensions.filters.http.router.v3.Router"}})
    return filters


def bootstrap(o: EnvoyOptions) -> dict:
    if not o.tiers:
        raise ValueError("at least one tier is required")
    if o.tenant_metadata_namespace and o.mode != "authz":
        # the 400-on-every-request deployment: HTTP ext_authz and RLS carry no metadata
        raise ValueError(f"the tenant comes from {o.tenant_metadata_namespace} metadata, which "
                         f"only gRPC ext_authz (--mode authz) sends; --mode {o.mode} would "
                         "answer every request 400 missing_tenant")
    if bool(o.jwt_issuer) != bool(o.jwt_jwks_file):
        raise ValueError("a JWT needs both its issuer and the JWKS file of its keys")
    vhost: dict = {"name": "llm", "domains": ["*"], "routes": _routes(o)}
    hcm: dict = {
        "@type": TYPE + "envoy.extensions.filters.network.http_connection_manager.v3."
                        "HttpConnectionManager",
        "stat_prefix": "llm",
        "codec_type": "AUTO",
        "route_config": {"name": "llm", "virtual_hosts": [vhost]},
        "http_filters": _filters(o),
        # A header name with an underscore (x_kt_tier) is dropped: the early mutation
        # removes x-kt-tier, but an upstream that reads "_" as "-" (CGI, WSGI, nginx's
        # underscores_in_headers) would take x_kt_tier for it. Counted in Envoy's
        # http.<stat_prefix>.dropped_headers_with_underscores.
        "common_http_protocol_options": {"headers_with_underscores_action": "DROP_HEADER"},
    }
    if o.mode in ("authz", "http-authz") and o.usage == "als":
        hcm["access_log"] = [_usage_access_log(o)]
    # Client-sent x-kt-decision/-tier/-model... are removed before any filter: the sidecar
    # overwrites them on an answer, but a fail-open (sidecar unreachable) would pass them
    # on and let x-kt-tier pick a route, and Envoy's rate-limit filter *appends* its
    # request_headers_to_add (seen on Envoy 1.40: "gpt-4o, gpt-4o-mini")
    # (x-kt-provider picks a route only where providers have one: removed there)
    mutations: list[dict] = [{"remove": h} for h in contract.UPSTREAM_HEADERS
                             if o.providers or h not in PROVIDER_HEADERS]
    if not o.estimate_trusted:  # a client must not set its own estimate (docs/security.md)
        mutations.append({"remove": o.estimate_header})
    if not o.attribution_trusted:  # nor name the end user or tags its spend goes to
        mutations += [{"remove": h} for h in o.attribution_headers]
    # nor its own request id: Envoy then makes one (it preserves a client's id when it
    # deems the client internal, e.g. on loopback or RFC 1918, whatever use_remote_address says)
    mutations.append({"remove": "x-request-id"})
    # nor make the provider take a metered POST for another method: the gateway routes and
    # decides by the method Envoy sees (frameworks behind some APIs honour these headers)
    mutations += [{"remove": h} for h in METHOD_OVERRIDE_HEADERS]
    if o.mode == "rls":
        # hits_addend's %REQ()% of an absent header is no number, and then Envoy drops the
        # whole descriptor (no RLS call: unlimited). "0" means "no estimate given" to the
        # sidecar (its default estimate applies); early mutations run before routing.
        mutations.append({"append": {"header": {"key": o.estimate_header, "value": "0"},
                                     "append_action": "ADD_IF_ABSENT"}})
    hcm["early_header_mutation_extensions"] = [{
        "name": "envoy.http.early_header_mutation.header_mutation",
        "typed_config": {
            "@type": TYPE + "envoy.extensions.http.early_header_mutation.header_mutation"
                            ".v3.HeaderMutation",
            "mutations": mutations}}]
    check_sidecar_credentials(o)
    clusters = [_sidecar_cluster("kt_sidecar", o.sidecar_address, True, o)]
    if o.mode == "http-authz":
        # Envoy closes an idle connection to the HTTP fast path before the sidecar does
        # (Envoy's default is an hour): otherwise a request Envoy sends on a pooled
        # connection just as the sidecar closes it fails, and Envoy's failure mode answers
        clusters.append(_sidecar_cluster("kt_sidecar_http", o.sidecar_http_address, False, o,
                                         idle_timeout_s=SIDECAR_HTTP_IDLE_TIMEOUT_S * 2 / 3))
    clusters += [_upstream_cluster(name, u, o) for t in o.tiers for name, u in _tier_clusters(t)]
    clusters += [_upstream_cluster(_provider_cluster(u), u, o) for u in o.providers]
    static: dict = {}
    secrets = _secrets(o)
    if secrets:
        static["secrets"] = secrets
    return {
        "admin": {"address": {"socket_address": {"address": o.admin_host,
                                                  "port_value": o.admin_port}}},
        "static_resources": {
            **static,
            "listeners": [{
                "name": "llm",
                "address": {"socket_address": {"address": o.listen_host,
                                               "port_value": o.listen_port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": hcm}]}],
            }],
            "clusters": clusters,
        },
    }


def check_sidecar_credentials(o: EnvoyOptions) -> None:
    """Refuse credential options that cannot work together (ValueError, one sentence)."""
    if (o.sidecar_tls_cert == "") != (o.sidecar_tls_key == ""):
        raise ValueError("--sidecar-tls-cert and --sidecar-tls-key go together")
    if o.sidecar_tls_cert and not o.sidecar_ca:
        raise ValueError("--sidecar-tls-cert needs --sidecar-ca, the CA that signed the "
                         "sidecar's certificate (Envoy checks who it talks to)")
    if o.sidecar_sni and not o.sidecar_ca:
        raise ValueError("--sidecar-sni applies to TLS to the sidecar: give --sidecar-ca too")
    if o.sidecar_sni:
        check_host(o.sidecar_sni, "--sidecar-sni")
    if (o.mode == "http-authz" and o.sidecar_ca and not o.sidecar_token_file
            and not is_loopback_host(host_of(o.sidecar_http_address))):
        # kt serve's fast path takes the token only (no TLS there)
        raise ValueError(f"--mode http-authz: the fast path at {o.sidecar_http_address} "
                         "takes the sidecar's token, not TLS: give --sidecar-token-file")


def sidecar_credential_note(o: EnvoyOptions) -> str:
    """A warning when Envoy would call a sidecar beyond loopback without a credential:
    `kt serve` refuses to listen there without one, so each call would fail."""
    if o.mode == "none" or o.sidecar_token_file or o.sidecar_ca:
        return ""
    remote = [a for a in ([o.sidecar_address] + (
        [o.sidecar_http_address] if o.mode == "http-authz" else []))
        if not is_loopback_host(host_of(a))]
    if not remote:
        return ""
    return (f"the sidecar at {', '.join(remote)} is beyond loopback, where kt serve needs a "
            "credential: give --sidecar-token-file or mTLS (--sidecar-tls-cert, "
            "--sidecar-tls-key, --sidecar-ca) as well (docs/security.md)")


def render(o: EnvoyOptions) -> str:
    credential = " and ".join(c for c, on in (
        (f"token from {o.sidecar_token_file}", o.sidecar_token_file),
        ("mTLS" if o.sidecar_tls_cert else "TLS", o.sidecar_ca)) if on)
    head = (f"# Envoy bootstrap for kt-sidecar ({o.mode} mode), printed by `kt envoy-config`.\n"
            f"# Sidecar at {o.sidecar_address}"
            + (f" ({credential})" if credential else "") + "; tiers: "
            + "; ".join(f"{t.name}={t.model}@" + " ".join(u.describe() for u in t.upstreams())
                        for t in o.tiers) + "\n")
    return head + yaml.safe_dump(bootstrap(o), sort_keys=False, width=100)
