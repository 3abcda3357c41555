"""The management API's overlay of holders over the policy file (docs/budgets.md,
"Management API"): what it holds, and how it layers over the file's document before the
one path every policy takes (sidecar/policy/load.py: schema, meaning checks, compile).

Precedence, holder by holder:
- an overlay entry with a ``block`` replaces the file's `tenants:` entry of that name
  whole (or adds one the file does not name); the block has the format of a `tenants:`
  entry and is checked by the same schema and meaning checks;
- an overlay entry ``deleted`` hides the file's entry: the holder is then unknown to the
  policy (the defaults, or refused under `unknown: deny`) until it is set again or the
  overlay entry is dropped (``DELETE ...?scope=overlay``);
- no overlay entry: the file's entry, as the file says (a reload of the file changes it).
A frozen holder (``frozen``) is refused whatever its limits say.
A reload of the file keeps the overlay: the new file is layered the same way.
"""
from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Any, Optional

import msgspec

from sidecar.model import valid_tenant
from sidecar.policy.load import CompiledPolicy, Layer, PolicyError, parse_policy, read_document

MAX_BLOCK_BYTES = 16 * 1024  # one holder's block, as JSON: far above any real one
MAX_HOLDERS = 100_000  # entries the overlay may hold (the policy file may hold more)


class Entry(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One holder's overlay entry: its block (a `tenants:` entry), or deleted."""
    block: Optional[dict[str, Any]] = None
    deleted: bool = False
    by: str = ""  # who set it (the admin credential's identity)
    at_us: int = 0


class Frozen(msgspec.Struct, frozen=True, kw_only=True):
    by: str = ""
    at_us: int = 0
    reason: str = ""


class Overlay(msgspec.Struct, frozen=True, kw_only=True):
    """The whole overlay at one version (the store's change counter: 0 = empty)."""
    version: int = 0
    holders: dict[str, Entry] = {}
    frozen: dict[str, Frozen] = {}

    def digest(self) -> str:
        """Short and stable for one content: the policy digest's overlay part."""
        body = msgspec.json.encode([sorted((k, v.block, v.deleted) for k, v in
                                           self.holders.items()), sorted(self.frozen)],
                                   order="deterministic")
        return "o" + hashlib.sha256(body).hexdigest()[:8]

    def empty(self) -> bool:
        return not self.holders and not self.frozen


_encode = msgspec.json.Encoder(order="deterministic").encode
_decode_overlay = msgspec.json.Decoder(Overlay).decode


def encode(overlay: Overlay) -> bytes:
    return _encode(overlay)


def decode(raw: bytes) -> Overlay:
    """An overlay from its JSON; raises msgspec.DecodeError / ValidationError."""
    return _decode_overlay(raw)


def encode_entry(entry: Entry) -> bytes:
    return _encode(entry)


def decode_entry(raw: bytes) -> Entry:
    return msgspec.json.decode(raw, type=Entry)


def encode_frozen(mark: Frozen) -> bytes:
    return _encode(mark)


def decode_frozen(raw: bytes) -> Frozen:
    return msgspec.json.decode(raw, type=Frozen)


def name_problem(name: str) -> Optional[str]:
    """Why ``name`` cannot be a holder's name, or None (the rule a request's tenant follows)."""
    if not valid_tenant(name):
        return ("a holder's name is 1..128 printable characters without braces "
                "(the rule a request's tenant follows)")
    if name != name.strip():
        # a request's tenant is read with its spaces stripped (decision/tenant.py): a
        # holder " acme" would never be a request's, and freezing it would refuse nothing
        return "a holder's name neither starts nor ends with a space"
    return None


def layer_of(overlay: Overlay) -> Optional[Layer]:
    """The change the overlay makes to the file's document (None: no change)."""
    if overlay.empty():
        return None

    def apply(doc: dict) -> dict:
        tenants = doc.get("tenants")
        merged = dict(tenants) if isinstance(tenants, dict) else {}
        for name, entry in overlay.holders.items():
            if entry.deleted:
                merged.pop(name, None)
            elif entry.block is not None:
                merged[name] = entry.block
        return {**doc, "tenants": merged}

    return apply, overlay.digest()


MAX_DEPTH = 64  # parent links followed from one holder (a policy's trees are far shallower)


def frozen_with_descendants(tenants: Any, frozen: frozenset[str]) -> frozenset[str]:
    """The frozen holders and every holder below one of them: a `tenants:` entry names its
    parent in `parent:` (issue 24's hierarchy), so freezing a team refuses its keys too.
    ``tenants`` is the layered document's map; an entry without a parent adds nothing."""
    if not frozen or not isinstance(tenants, dict):
        return frozen
    parents = {name: entry["parent"] for name, entry in tenants.items()
               if isinstance(entry, dict) and isinstance(entry.get("parent"), str)}
    if not parents:
        return frozen
    out = set(frozen)
    for name in parents:
        node: Optional[str] = name
        for _ in range(MAX_DEPTH):
            node = parents.get(node) if node is not None else None
            if node is None:
                break
            if node in frozen:
                out.add(name)
                break
    return frozenset(out)


def compile_layered(raw: bytes, source: str, overlay: Overlay) -> CompiledPolicy:
    """The policy file's bytes with the overlay over them, through the one path every
    policy takes; raises PolicyError (the layered document's errors). The frozen set holds
    every holder below a frozen one."""
    layer = layer_of(overlay)
    seen: dict[str, Any] = {}
    if layer is not None and overlay.frozen:
        apply, digest = layer

        def apply_and_see(doc: dict) -> dict:
            out = apply(doc)
            seen["tenants"] = out.get("tenants")
            return out

        layer = (apply_and_see, digest)
    policy = parse_policy(raw, source, layer)
    if overlay.frozen:
        policy = replace(policy, frozen=frozen_with_descendants(
            seen.get("tenants"), frozenset(overlay.frozen)))
    return policy


QUARANTINE_ROUNDS = 3  # compiles tried, each setting aside the holders the last one blamed


def compile_quarantined(raw: bytes, source: str,
                        overlay: Overlay) -> tuple[CompiledPolicy, frozenset[str]]:
    """The layered policy, and the holders set aside to get it. A block valid over one
    sidecar's file may not be over another's (a ConfigMap mid-rollout, a sidecar of another
    version): the holders its errors name (`$.tenants.<name>...`: the block itself, or a
    file entry it broke, e.g. whose parent it deleted) are taken out of the document and
    refused (held as frozen: never the file's entry, which may hand a holder limits an
    operator took away, nor the defaults); every other holder's change is served. Raises
    PolicyError when the errors name no holder, or still do after QUARANTINE_ROUNDS."""
    try:
        return compile_layered(raw, source, overlay), frozenset()
    except PolicyError as exc:
        first = exc
    head = f"{source}: $.tenants."
    names = _names_of(overlay, raw)  # once: the file may hold 100,000 holders
    aside: set[str] = set()
    error = first
    for _ in range(QUARANTINE_ROUNDS):
        blamed = set()
        for line in error.errors:
            if line.startswith(head):
                name = _blamed_name(line[len(head):], names)
                if name is not None:
                    blamed.add(name)
        if not blamed - aside:
            raise first
        aside |= blamed
        holders = dict(overlay.holders)
        for name in aside:
            holders[name] = Entry(deleted=True)
        trial = Overlay(version=overlay.version, holders=holders,
                        frozen={**overlay.frozen, **{n: Frozen(reason="quarantined: its block "
                                                               "does not compile here")
                                                     for n in aside}})
        try:
            return compile_layered(raw, source, trial), frozenset(aside)
        except PolicyError as exc:
            error = exc
    raise first


def _blamed_name(rest: str, names: set[str]) -> Optional[str]:
    """The holder an error line names: the longest holder name that ``rest`` (the line after
    `$.tenants.`) starts with, followed by the line's next separator (names may hold dots)."""
    best = None
    for i, ch in enumerate(rest):
        if ch in ".: [" and rest[:i] in names:
            best = rest[:i]
        if ch == ":":  # the path ends at the first colon: what follows is the message
            break
    return best if best is not None or rest not in names else rest


def _names_of(overlay: Overlay, raw: bytes) -> set[str]:
    """Holder names an error line may name: the overlay's and the file's (decoded loosely:
    the file compiled alone when it was loaded)."""
    names = set(overlay.holders)
    try:
        doc = read_document(raw, "")
    except PolicyError:
        return names
    tenants = doc.get("tenants") if isinstance(doc, dict) else None
    if isinstance(tenants, dict):
        names |= {n for n in tenants if isinstance(n, str)}
    return names


def block_errors(exc: PolicyError, source: str, name: str) -> list[str]:
    """A layered policy's errors as a block's: ``$.tenants.<name>.x`` reads ``$.x``."""
    head = f"{source}: $.tenants.{name}"
    out = []
    for line in exc.errors:
        if line.startswith(head):
            out.append("$" + line[len(head):])
        else:
            out.append(line)
    return out
