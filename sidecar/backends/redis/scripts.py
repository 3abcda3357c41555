"""The Lua scripts of the Redis backend, and the RESP encoding of the commands that call
them.

Redis scripts cannot import one another, so each script sent is lua/common.lua and the
files it needs, joined at load (``Script``); ``SCRIPTS`` is every script a link loads.
Commands are encoded here rather than by redis-py: its generic pack_command costs ~50 µs
for a 20-argument call (docs/redis.md says why the hot path does not go through it).
"""
from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path
from typing import Any

from sidecar import _core


def load_script(name: str) -> str:
    """lua/<name> from the source tree when running from a checkout, else the packaged copy."""
    repo = Path(__file__).resolve().parents[3] / "lua" / name
    if repo.is_file():
        return repo.read_text()
    return resources.files("sidecar").joinpath("lua", name).read_text()


def bulk(arg: Any) -> bytes:
    """One argument as a RESP bulk string."""
    b = arg if isinstance(arg, bytes) else str(arg).encode()
    return b"$%d\r\n%s\r\n" % (len(b), b)


def bulks(args: Any) -> bytes:
    """Each argument as a RESP bulk string, joined: ``bulk`` of each, without a call and a
    generator step per argument (a settlement sends ~20: 10 -> 7 µs)."""
    out = []
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%b\r\n" % (len(b), b))
    return b"".join(out)


def pack(*args: Any) -> bytes:
    """One command in RESP: *N, then each argument as a bulk string."""
    return b"*%d\r\n" % len(args) + b"".join(bulk(a) for a in args)


def evalsha_head(sha: str, nargs: int) -> bytes:
    """The start of an EVALSHA of ``nargs`` arguments after the SHA (the key count, the
    keys, the arguments): the caller appends them, already encoded."""
    return b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n" % (2 + nargs, sha.encode())


class Script:
    """A script made of lua/common.lua and ``files`` (its own name alone by default), or
    of ``source`` as given."""

    __slots__ = ("name", "source", "sha")

    def __init__(self, name: str, *files: str, source: str = "") -> None:
        self.name = name
        self.source = source or "\n".join(
            load_script(f) for f in ("common.lua", *(files or (name,))))
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()


def _settle_batch() -> Script:
    """settle.lua as the body of ``settle_one(KEYS, ARGV)``, then the batch loop
    (lua/batch.lua) and lua/settle_batch.lua: the settlement rule is written once."""
    return Script("settle_batch.lua", source="\n".join([
        load_script("common.lua"), load_script("ledger_spend.lua"),
        "local function settle_one(KEYS, ARGV)", load_script("settle.lua"), "end",
        load_script("batch.lua"), load_script("settle_batch.lua")]))


class Scripts:
    """Every script the backend calls; a link loads them all before any call on it."""

    def __init__(self) -> None:
        self.decide = Script("decide.lua", "decide.lua", "deadline.lua", "decide_one.lua")
        self.decide_batch = Script("decide_batch.lua", "decide.lua", "deadline.lua",
                                   "batch.lua", "decide_batch.lua")
        # the ledger's spend per tenant, day and model rides on settle (lua/ledger_spend.lua)
        self.settle = Script("settle.lua", "ledger_spend.lua", "settle.lua")
        self.settle_batch = _settle_batch()
        self.record_spend = Script("record_spend.lua", "ledger_spend.lua", "record_spend.lua")
        # provider quotas (docs/providers.md): one node decides tenant and provider in one
        # script; a cluster takes the provider first, then decides the tenant
        self.routed = Script("routed.lua", "provider.lua", "decide.lua", "routed.lua",
                             "deadline.lua", "routed_one.lua")
        self.routed_batch = Script("routed_batch.lua", "provider.lua", "decide.lua",
                                   "routed.lua", "deadline.lua", "batch.lua",
                                   "routed_batch.lua")
        self.provider_take = Script("provider_take.lua", "provider.lua", "provider_take.lua")
        self.provider_settle = Script("provider_settle.lua", "provider.lua",
                                      "provider_settle.lua")
        # a decision over a path of cells (a holder and its parents, its windows, its
        # model's cell: docs/budgets.md), and its settlement
        self.decide_path = Script("decide_path_one.lua", "cell.lua", "decide_path.lua",
                                  "deadline.lua", "decide_path_one.lua")
        self.decide_path_batch = Script("decide_path_batch.lua", "cell.lua", "decide_path.lua",
                                        "deadline.lua", "batch.lua", "decide_path_batch.lua")
        self.settle_path = Script("settle_path.lua", "cell.lua", "ledger_spend.lua",
                                  "settle_path.lua")
        # capacity leases (lease.py)
        self.lease = Script("lease.lua")
        self.lease_sweep = Script("lease_sweep.lua")

    def all(self) -> tuple[Script, ...]:
        return (self.decide, self.decide_batch, self.settle, self.settle_batch, self.routed,
                self.routed_batch, self.provider_take, self.provider_settle,
                self.record_spend, self.lease, self.lease_sweep, self.decide_path,
                self.decide_path_batch, self.settle_path)


def limit_args(limits: _core.Limits) -> list:
    """A tenant's limits as decide.lua's ARGV after the request's own (and lease.lua's)."""
    args: list = [limits.rpm, limits.tpm, repr(limits.burst), limits.budget,
                  1 if limits.budget_in_usd else 0, limits.period, repr(limits.low_water),
                  limits.ntiers]
    for pin, pout in limits.prices:
        args += [pin, pout]
    return args


def quota_args(quota: _core.Quota) -> list:
    """A provider's quota as provider.lua reads it (docs/providers.md)."""
    return [quota.rpm, quota.tpm, quota.rpd, repr(quota.burst),
            *(repr(f) for f in quota.floors)]
