"""The management API of holders on the admin port (docs/budgets.md, "Management API";
the routes are the OpenAPI document's, sidecar/openapi.json):

  GET    /v1/tenants[?limit=N&after=NAME]   holders served, by name, a page at a time
  GET    /v1/tenants/{name}                 its policy as in force, where it came from,
                                            its overlay entry, freeze mark, live counters
  PUT    /v1/tenants/{name}                 set its block (a `tenants:` entry, JSON)
  DELETE /v1/tenants/{name}[?scope=overlay] hide it (or drop only its overlay entry)
  POST   /v1/tenants/{name}/freeze|unfreeze refuse all its requests, or stop refusing

Authenticated by the admin port's rule before anything here runs (http_routes.py). A
name or body that is not acceptable is a 400 with a JSON body saying why, and changes
nothing; every change is checked by compiling the policy it makes (the one path every
policy takes), written to the overlay store (sidecar/backends/overlay_store.py), served
at once here and within a second by every other sidecar on the same store, and recorded
as an audit event in the ledger (who, what, before, after).
"""
from __future__ import annotations

import asyncio
import bisect
import json
import logging
import re
import time
from typing import Any, Callable, Optional
from urllib.parse import parse_qs, unquote

import msgspec

from sidecar import _core
from sidecar.backends.base import Backend, BackendError
from sidecar.backends.overlay_store import Fields
from sidecar.http_routes import TENANTS
from sidecar.ledger.recorder import Ledger
from sidecar.ledger.spend import HELD_DAY, day_of
from sidecar.overlay_sync import OverlayKeeper
from sidecar.policy import overlay as ov
from sidecar.policy.holders import PathCell, refresh_windows
from sidecar.policy.load import PERIODS, CompiledPolicy, PolicyError, TenantRule
from sidecar.transports.http_side import HttpRequest, HttpResponse

log = logging.getLogger("kt.admin")

MAX_PAGE = 1000
DEFAULT_PAGE = 100
MAX_REASON = 256
PERIOD_NAMES = {v: k for k, v in PERIODS.items()}


def _json(status: int, doc: Any) -> HttpResponse:
    return HttpResponse(status, json.dumps(doc, sort_keys=True).encode(), "application/json")


def _error(status: int, code: str, message: str, **extra: Any) -> HttpResponse:
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            405: "invalid_request_error", 409: "conflict_error"}.get(status, "api_error")
    return _json(status, {"error": {"type": kind, "code": code, "message": message, **extra}})


def _split(path: str) -> Optional[tuple[str, str]]:
    """(name, action) of /v1/tenants/{name}[/action]; ("", "") for /v1/tenants; None: not
    one of ours. The name is percent-decoded after the path is split, so a name may hold
    any character its rule allows (a "/" written %2F)."""
    if path in (TENANTS, TENANTS + "/"):
        return "", ""
    if not path.startswith(TENANTS + "/"):
        return None
    rest = path[len(TENANTS) + 1:].split("/")
    if len(rest) == 1:
        return unquote(rest[0], errors="strict"), ""
    if len(rest) == 2 and rest[1] in ("freeze", "unfreeze"):
        return unquote(rest[0], errors="strict"), rest[1]
    return None


def effective(rule: TenantRule) -> dict[str, Any]:
    """A compiled rule as an operator reads it: the limits in force (the defaults' where
    the holder's block leaves them out), in the policy's units."""
    lim = rule.limits
    budget: Optional[dict[str, Any]] = None
    if lim.budget >= 0:
        amount: Any = lim.budget / 1e9 if lim.budget_in_usd else lim.budget
        budget = {("usd" if lim.budget_in_usd else "tokens"): amount,
                  "period": PERIOD_NAMES.get(lim.period, str(lim.period)),
                  "low_water": lim.low_water}
    return {"priority": rule.priority, "shadow_mode": rule.shadow,
            "spill_to_next_tier": rule.spill_to_next_tier,
            "limits": {"rpm": lim.rpm or None, "tpm": lim.tpm or None, "burst": lim.burst},
            "budget": budget}


class TenantsApi:
    def __init__(self, keeper: OverlayKeeper, policy: Callable[[], CompiledPolicy],
                 backend: Backend, ledger: Ledger,
                 now_us: Callable[[], int] = lambda: time.time_ns() // 1000) -> None:
        self.keeper = keeper
        self.policy = policy
        self.backend = backend
        self.ledger = ledger
        self.now_us = now_us
        self._names: tuple[Optional[CompiledPolicy], list[str]] = (None, [])

    async def handle(self, req: HttpRequest, who: str) -> HttpResponse:
        try:
            route = _split(req.path)
        except UnicodeDecodeError:
            return _error(400, "invalid_name", "the holder's name is not UTF-8")
        if route is None:
            return _error(404, "no_such_route", f"no such route: {req.path[:200]}")
        name, action = route
        if not name and not action:
            if req.method not in ("GET", "HEAD"):
                return _error(405, "method_not_allowed", "GET only")
            return await self.list(req.query)
        problem = ov.name_problem(name)
        if problem is not None:
            return _error(400, "invalid_name", problem)
        if action:
            if req.method != "POST":
                return _error(405, "method_not_allowed", "POST only")
            return await self.freeze(name, action == "freeze", req.body, who)
        if req.method in ("GET", "HEAD"):
            return await self.get(name)
        if req.method == "PUT":
            return await self.put(name, req.body, who, req.query)
        if req.method == "DELETE":
            return await self.delete(name, req.query, who)
        return _error(405, "method_not_allowed", "GET, PUT or DELETE")

    # --- reading -----------------------------------------------------------------------
    async def _sorted_names(self, policy: CompiledPolicy) -> list[str]:
        if self._names[0] is not policy:
            # sorted once per policy served, in a thread: 100,000 names take tens of ms,
            # which the decisions' event loop must not wait for
            self._names = (policy, await asyncio.to_thread(sorted, policy.tenants))
        return self._names[1]

    async def list(self, query: str) -> HttpResponse:
        q = parse_qs(query, keep_blank_values=True)
        limit_text = q.get("limit", [str(DEFAULT_PAGE)])[-1]
        if not (limit_text.isascii() and limit_text.isdigit()
                and 1 <= int(limit_text) <= MAX_PAGE):
            return _error(400, "invalid_query", f"limit must be an integer in 1..{MAX_PAGE}")
        limit = int(limit_text)
        after = q.get("after", [""])[-1]
        policy = self.policy()
        names = await self._sorted_names(policy)
        start = bisect.bisect_right(names, after) if after else 0
        page = names[start:start + limit]
        holders = self.keeper.overlay.holders
        items = [{"name": n, "source": "overlay" if n in holders else "file",
                  "frozen": n in policy.frozen} for n in page]
        more = start + limit < len(names)
        return _json(200, {"tenants": items, "next": page[-1] if more and page else None,
                           "total": len(names), "overlay_version": self.keeper.served_version,
                           "frozen": sorted(policy.frozen)[:MAX_PAGE]})

    async def get(self, name: str) -> HttpResponse:
        policy = self.policy()
        overlay = self.keeper.overlay
        entry = overlay.holders.get(name)
        mark = overlay.frozen.get(name)
        rule = policy.tenants.get(name)
        if rule is not None:
            source = "overlay" if entry is not None else "file"
        elif policy.unknown_tenant == "defaults":
            rule, source = policy.defaults, "defaults"
        else:
            source = "none"
        if rule is None and entry is None and mark is None:
            return _error(404, "not_found", f"no holder {name!r}: the policy does not name "
                          "it and unknown tenants are refused")
        doc: dict[str, Any] = {
            "name": name, "source": source,
            "deleted": bool(entry is not None and entry.deleted),
            "policy": effective(rule) if rule is not None else None,
            "overlay": msgspec.to_builtins(entry) if entry is not None else None,
            "frozen": msgspec.to_builtins(mark) if mark is not None else None,
            "overlay_version": self.keeper.served_version,
        }
        doc["counters"] = await self.counters(name, rule) if rule is not None else None
        return _json(200, doc)

    async def counters(self, name: str, rule: TenantRule) -> dict[str, Any]:
        """Live counters from the backend: the spend of this budget period, settled and
        durable (every replica's; sidecar/ledger/spend.py), per model, and the budget
        left; the buckets' levels where the backend can read them without deciding."""
        now = self.now_us()
        lim = rule.limits
        start, end = _budget_period(rule, now)
        out: dict[str, Any] = {"at_us": now, "period_start_us": start,
                               "period_end_us": end if end != _core.NO_END_US else None}
        try:
            out["live"] = await asyncio.wait_for(
                self.live(name, lim, now) if rule.path is None and not rule.model_paths
                else self.live_cells(name, rule, now), 5)
        except (BackendError, asyncio.TimeoutError) as exc:
            out["live"] = {"error": f"state not readable: {exc or type(exc).__name__}"}
        try:
            cells = await asyncio.wait_for(
                self.backend.spend_cells(day_of(start) if start > 0 else 0, day_of(now),
                                         tenant=name), 5)
        except (BackendError, asyncio.TimeoutError) as exc:
            out["error"] = f"spend not readable: {exc or type(exc).__name__}"
            return out
        models: dict[str, dict[str, int]] = {}
        held = 0
        for c in cells:
            if c.tenant != name:
                continue
            if c.day == HELD_DAY:  # what the budget holds for requests not settled yet
                held += c.counts[0] if c.model == str(start) else 0
                continue
            m = models.setdefault(c.model, dict.fromkeys(
                ("requests", "input_tokens", "output_tokens", "cost_nano_usd"), 0))
            n, i, o, _cr, _cw, cost = c.counts
            m["requests"] += n
            m["input_tokens"] += i
            m["output_tokens"] += o
            m["cost_nano_usd"] += cost
        tokens = sum(m["input_tokens"] + m["output_tokens"] for m in models.values())
        cost = sum(m["cost_nano_usd"] for m in models.values())
        out["spend"] = {"models": models, "tokens": tokens, "cost_usd": cost / 1e9}
        if lim.budget >= 0:
            settled = cost if lim.budget_in_usd else tokens
            scale = 1e9 if lim.budget_in_usd else 1
            out["budget"] = {"unit": "usd" if lim.budget_in_usd else "tokens",
                             "limit": lim.budget / scale, "settled": settled / scale,
                             "held": held / scale,
                             "remaining": max(0, lim.budget - settled - held) / scale}
        return out

    async def live(self, name: str, lim: _core.Limits, now: int) -> Optional[dict[str, Any]]:
        """The buckets' levels and the budget's spend as they stand now: the backend's
        stored state brought to ``now`` by the decision core itself (a decision of no tokens
        on a copy: refill, period roll-over), so the rule exists once. None: the backend
        cannot read a holder's state alone."""
        st = await self.backend.read_state(name)
        if st is None:
            return None
        out = _core.decide(lim, st, now, 0, 0, 0, 0, False)  # on the copy: nothing changes
        live: dict[str, Any] = {"next_request": "allow" if out.kind <= 1 else "refused"}
        if lim.rpm > 0:  # the probe took one request from the copy when it admitted it
            level = st.req_level + (1.0 if out.kind <= 1 else 0.0)
            live["requests"] = {"per_minute": lim.rpm, "capacity": lim.req_cap,
                                "level": round(level, 3)}
        if lim.tpm > 0:
            live["tokens"] = {"per_minute": lim.tpm, "capacity": lim.tok_cap,
                              "level": round(st.tok_level, 3), "full_in_us": out.reset_tokens_us}
        if lim.budget >= 0:
            scale = 1e9 if lim.budget_in_usd else 1
            live["budget"] = {"unit": "usd" if lim.budget_in_usd else "tokens",
                              "limit": lim.budget / scale, "spent": st.spent / scale,
                              "remaining": max(0, lim.budget - st.spent) / scale,
                              "resets_in_us": out.budget_reset_us or None}
        return live

    async def live_cells(self, name: str, rule: TenantRule, now: int) -> dict[str, Any]:
        """A holder on a tree (docs/budgets.md): each of its own cells (its windows, its
        model cells) as the backend holds it now, brought to ``now`` by the decision core
        on a copy, as ``live`` does for a holder of one cell. Its parents' cells are theirs
        (GET them by name)."""
        mine: dict[str, tuple[str, PathCell]] = {}
        for path in [p for p in (rule.path, *(rule.model_paths or {}).values())
                     if p is not None]:
            refresh_windows(path, lambda: now)
            for cell in path.cells:
                if cell.holder == name and cell.id not in mine:
                    mine[cell.id] = (path.root, cell)
        windows = []
        admits = True
        for root, cell in mine.values():
            st = await self.backend.read_cell_state(root, cell.id)
            if st is None:
                continue
            lim = cell.limits
            out = _core.decide(lim, st, now, 0, 0, 0, 0, False)  # on the copy
            admits = admits and out.kind <= 1
            window: dict[str, Any] = {"cell": cell.id, "what": cell.label}
            if lim.rpm > 0:
                window["requests"] = {"per_minute": lim.rpm, "capacity": lim.req_cap,
                                      "level": round(st.req_level + (1.0 if out.kind <= 1
                                                                     else 0.0), 3)}
            if lim.tpm > 0:
                window["tokens"] = {"per_minute": lim.tpm, "capacity": lim.tok_cap,
                                    "level": round(st.tok_level, 3)}
            if lim.budget >= 0:
                scale = 1e9 if lim.budget_in_usd else 1
                window["budget"] = {"unit": cell.unit, "limit": lim.budget / scale,
                                    "spent": st.spent / scale,
                                    "remaining": max(0, lim.budget - st.spent) / scale,
                                    "resets_in_us": out.budget_reset_us or None}
            windows.append(window)
        return {"next_request": "allow" if admits else "refused", "cells": windows}

    # --- changing ----------------------------------------------------------------------
    async def _change(self, name: str, action: str, who: str, fields: Fields,
                      overlay: ov.Overlay, force: bool = False) -> HttpResponse:
        """Check the overlay compiles over the file, write it, serve it, audit it."""
        keeper = self.keeper
        try:
            # another holder's stored block this sidecar's file does not compile (a file
            # mid-rollout) stays set aside here as on the poll; but a change that breaks a
            # holder (its own block, or a key whose parent it deletes) is refused
            policy, aside = await asyncio.to_thread(keeper.compile_aside, overlay)
            if name in aside or aside - keeper.aside:
                await asyncio.to_thread(keeper.compile, overlay)  # raises: the errors
        except PolicyError as exc:
            errors = ov.block_errors(exc, keeper.source, name)
            return _error(400, "invalid_policy", f"the holder's block is not a valid "
                          f"`tenants:` entry: {errors[0]}", errors=errors)
        moved = tree_moves(self.policy(), policy) if self.backend.name == "redis" else []
        if moved and not force:
            # a tree's cells are kept under its root's hash tag (one slot): a holder that
            # changes tree (or joins one) finds new keys, its period's spend at zero
            return _error(409, "tree_change", f"this change moves {len(moved)} holders to "
                          f"another tree ({', '.join(moved[:5])}): on Redis their counters "
                          "are kept under their tree's root and would start again from zero "
                          "this period. Make it when their periods end, or add ?force=true",
                          holders=moved[:100])
        changed = unit_changes(self.policy(), policy, name)
        if changed and not force:
            # the period's spend is kept as a number in the window's unit: read in another
            # unit it would be a free period (95,000 tokens -> $0.000095) or a lockout
            return _error(409, "budget_unit_change", f"{name}'s {changed[0]} changes unit: "
                          "the spend this period was counted in the old one. Change it when "
                          "the period ends, or add ?force=true to start that window's count "
                          "again from zero (audited)", windows=changed)
        try:
            version, before, unserved = await keeper.commit(fields, overlay, policy)
        except BackendError as exc:
            # a change the store did not confirm may still have been applied (a reply lost
            # after the write): GET says, and the poll serves it if it was
            return _error(503, "store_unavailable", f"the overlay store did not confirm the "
                          f"change (read the holder back before retrying): {exc}")
        log.info("management API: %s %s %r (overlay version %d)", who, action, name, version)
        for key, old in before.items():
            new = fields[key]
            self.ledger.admin_change(who=who, action=action, holder=name,
                                     before=old.decode() if old else "",
                                     after=new.decode() if new else "", version=version)
        doc = {"name": name, "action": action, "overlay_version": version,
               "policy_digest": self.policy().digest}
        if aside and not unserved:
            unserved = (f"holders set aside (refused) here, their blocks do not compile over "
                        f"this sidecar's file: {', '.join(sorted(aside)[:10])}")
        if unserved:
            # made (the store confirmed it, every other sidecar serves it, audited), but the
            # store's whole overlay (another sidecar's change with it) does not compile here
            doc["warning"] = (f"the change is made, but this sidecar does not serve the "
                              f"stored overlay yet (its freeze marks apply): {unserved}")
        return _json(200, doc)

    async def _current(self) -> ov.Overlay:
        """The overlay a change starts from (under the keeper's lock): the store's, when
        another sidecar changed it since this one last polled."""
        try:
            await self.keeper.sync_locked()
        except (BackendError, PolicyError):
            pass  # the change itself says whether the store takes it
        return self.keeper.overlay

    def _writable(self) -> Optional[HttpResponse]:
        if self.keeper.raw is None:
            return _error(409, "no_policy_file", "this sidecar serves a policy it was handed, "
                          "not a file: holders cannot be layered over it")
        return None

    async def put(self, name: str, body: bytes, who: str, query: str = "") -> HttpResponse:
        refused = self._writable()
        if refused is not None:
            return refused
        if len(body) > ov.MAX_BLOCK_BYTES:
            return _error(400, "invalid_body", f"the block is larger than "
                          f"{ov.MAX_BLOCK_BYTES} bytes")
        try:
            block = msgspec.json.decode(body)
        except (msgspec.DecodeError, RecursionError) as exc:
            return _error(400, "invalid_body", f"the body is not JSON: {exc}")
        if not isinstance(block, dict):
            return _error(400, "invalid_body", "the body must be a JSON object: the holder's "
                          "block, in the format of a `tenants:` entry of the policy file")
        async with self.keeper.lock:
            current = await self._current()
            if name not in current.holders and len(current.holders) >= ov.MAX_HOLDERS:
                return _error(409, "overlay_full", f"the overlay holds {ov.MAX_HOLDERS} "
                              "holders; move some into the policy file")
            entry = ov.Entry(block=block, by=who, at_us=self.now_us())
            overlay = msgspec.structs.replace(current, holders={**current.holders,
                                                                name: entry})
            return await self._change(name, "set", who, {f"h:{name}": ov.encode_entry(entry)},
                                      overlay, force=_forced(query))

    async def delete(self, name: str, query: str, who: str) -> HttpResponse:
        refused = self._writable()
        if refused is not None:
            return refused
        scope = parse_qs(query).get("scope", [""])[-1]
        if scope not in ("", "overlay"):
            return _error(400, "invalid_query", "scope is `overlay` (drop only the overlay "
                          "entry, the file's entry serves again) or absent")
        async with self.keeper.lock:
            current = await self._current()
            holders = dict(current.holders)
            if scope == "overlay":
                if holders.pop(name, None) is None:
                    return _error(404, "not_found", f"{name!r} has no overlay entry")
                overlay = msgspec.structs.replace(current, holders=holders)
                return await self._change(name, "delete_overlay", who, {f"h:{name}": None},
                                          overlay, force=_forced(query))
            if name not in self.policy().tenants:
                return _error(404, "not_found", f"no holder {name!r} is served")
            entry = ov.Entry(deleted=True, by=who, at_us=self.now_us())
            holders[name] = entry
            overlay = msgspec.structs.replace(current, holders=holders)
            return await self._change(name, "delete", who, {f"h:{name}": ov.encode_entry(entry)},
                                      overlay, force=_forced(query))

    async def freeze(self, name: str, freeze: bool, body: bytes, who: str) -> HttpResponse:
        reason = ""
        if freeze and body.strip():
            try:
                doc = msgspec.json.decode(body)
            except (msgspec.DecodeError, RecursionError) as exc:
                return _error(400, "invalid_body", f"the body is not JSON: {exc}")
            if not isinstance(doc, dict) or set(doc) - {"reason"} or not isinstance(
                    doc.get("reason", ""), str) or len(doc.get("reason", "")) > MAX_REASON:
                return _error(400, "invalid_body", "the body is optional: {\"reason\": text "
                              f"of at most {MAX_REASON} characters}}")
            reason = doc.get("reason", "")
        async with self.keeper.lock:
            current = await self._current()
            frozen = dict(current.frozen)
            if freeze == (name in frozen):
                return _json(200, {"name": name, "action": "freeze" if freeze else "unfreeze",
                                   "overlay_version": self.keeper.served_version,
                                   "unchanged": True})
            if freeze:
                if len(frozen) >= ov.MAX_HOLDERS:
                    return _error(409, "overlay_full", f"{ov.MAX_HOLDERS} holders are frozen")
                mark = ov.Frozen(by=who, at_us=self.now_us(), reason=reason)
                frozen[name] = mark
                value: Optional[bytes] = ov.encode_frozen(mark)
            else:
                del frozen[name]
                value = None
            overlay = msgspec.structs.replace(current, frozen=frozen)
            return await self._change(name, "freeze" if freeze else "unfreeze", who,
                                      {f"f:{name}": value}, overlay)


_UNIT_WORD = re.compile(r"\b(usd|tokens) ")
PERIOD_NAMES = {code: name for name, code in PERIODS.items()}


def _forced(query: str) -> bool:
    return parse_qs(query).get("force", [""])[-1] in ("true", "1")


def _budget_windows(rule: Optional[TenantRule], holder: str) -> dict[str, str]:
    """The holder's budgeted windows, each by what it counts (its model and period, e.g.
    "budget per month", "gpt-4o budget per day", or "own cell": the cell kept under the
    holder's own name, whatever its window) -> its unit."""
    if rule is None:
        return {}
    if rule.path is None:
        if not rule.budget_unit:
            return {}
        window = f"budget per {PERIOD_NAMES.get(rule.limits.period, rule.limits.period)}"
        return {window: rule.budget_unit, "own cell": rule.budget_unit}
    out: dict[str, str] = {}
    paths = [rule.path, *(rule.model_paths or {}).values()]
    for path in paths:
        for cell in path.cells:
            if cell.holder != holder or not cell.unit:
                continue
            out[_UNIT_WORD.sub("", cell.label)] = cell.unit
            if cell.id == holder:
                out["own cell"] = cell.unit
    return out


def unit_changes(before: CompiledPolicy, after: CompiledPolicy, holder: str) -> list[str]:
    """The holder's budget windows (by model and period) that count in another unit after
    the change, or whose state (the cell under its own name) would be read as another
    window's: each would read this period's spend in the wrong unit."""
    old = _budget_windows(before.rule_for(holder), holder)
    new = _budget_windows(after.rule_for(holder), holder)
    return [w for w in old if w in new and old[w] != new[w]]


def _budget_period(rule: TenantRule, now: int) -> tuple[int, int]:
    """[start, end) of the period the holder's first budget counts in now: a calendar
    window (a time zone, an anchor: P_WINDOW) is computed by its path, not the clock's
    UTC rule; no budget: the UTC day (what its spend is kept by)."""
    lim = rule.limits
    if lim.budget < 0:
        return _core.period_bounds(now, _core.P_DAY)
    if lim.period != _core.P_WINDOW:
        return _core.period_bounds(now, lim.period)
    for path in (rule.path, *(rule.model_paths or {}).values()):
        if path is None:
            continue
        for cell in path.cells:
            if cell.limits is lim and cell.calendar is not None:
                return cell.calendar.window(now)[:2]
    return _core.period_bounds(now, _core.P_DAY)  # not reached: a window has its cell


def _kept_under(rule: TenantRule) -> Optional[str]:
    """Where a holder's state is kept on Redis: None for a flat holder's own keys, else
    the root of the tree whose hash tag holds its cells."""
    paths = [p for p in (rule.path, *(rule.model_paths or {}).values()) if p is not None]
    return paths[0].root if paths else None


def tree_moves(before: CompiledPolicy, after: CompiledPolicy) -> list[str]:
    """The holders whose state would be read from other keys after the change: they
    join a tree, leave one, or move under another root (sorted)."""
    return sorted(name for name, rule in after.tenants.items()
                  if (old := before.tenants.get(name)) is not None
                  and _kept_under(old) != _kept_under(rule))
