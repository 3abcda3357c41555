"""`kt tenants list|get|set|delete|freeze|unfreeze`: the management API of holders
(sidecar/tenants_api.py, docs/budgets.md "Management API") from the command line. Each
command is one call to a running sidecar's admin port (sidecar/admin_client.py: one line
on any failure, the 400's reasons shown); --json prints the answer as it came."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any
from urllib.parse import quote, urlencode

import yaml

from sidecar.admin_client import AdminFailed, admin_call, client_args

TENANTS = "/v1/tenants"


def _path(name: str, action: str = "") -> str:
    return f"{TENANTS}/{quote(name, safe='')}" + (f"/{action}" if action else "")


def _print(args: argparse.Namespace, doc: Any, text: str) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=True) + "\n" if args.json else text)


def _list(args: argparse.Namespace) -> int:
    items: list[dict] = []
    after = args.after or ""
    while True:
        query = urlencode({"limit": args.limit, **({"after": after} if after else {})})
        doc = admin_call(args, "tenants list", TENANTS, query)
        items += doc.get("tenants", [])
        after = doc.get("next") or ""
        if not args.all or not after:
            break
    if args.json:
        _print(args, {**doc, "tenants": items}, "")
        return 0
    lines = [f"{'holder':<40} {'source':<8} frozen"]
    lines += [f"{t['name']:<40} {t['source']:<8} {'yes' if t.get('frozen') else ''}"
              for t in items]
    if after and not args.all:
        lines.append(f"... more: --after {after} (or --all)")
    print("\n".join(lines))
    return 0


def _amount(budget: dict) -> str:
    if budget.get("usd") is not None:
        return f"${budget['usd']:g}"
    return f"{budget.get('tokens')} tokens"


def _get(args: argparse.Namespace) -> int:
    doc = admin_call(args, "tenants get", _path(args.name))
    if args.json:
        _print(args, doc, "")
        return 0
    lines = [f"holder   {doc['name']} (from the {doc['source']}"
             + (", deleted in the overlay" if doc.get("deleted") else "") + ")"]
    if doc.get("frozen"):
        f = doc["frozen"]
        lines.append(f"FROZEN   by {f.get('by')}" + (f": {f['reason']}" if f.get("reason") else ""))
    rule = doc.get("policy")
    if rule:
        lim = rule["limits"]
        lines.append(f"limits   rpm {lim.get('rpm') or '-'}, tpm {lim.get('tpm') or '-'}, "
                     f"burst {lim.get('burst')}; priority {rule.get('priority')}")
        b = rule.get("budget")
        lines.append(f"budget   {_amount(b)} per {b['period']}, low water {b['low_water']}"
                     if b else "budget   none")
    counters = doc.get("counters") or {}
    cb = counters.get("budget")
    if cb:
        lines.append(f"left     {cb['remaining']:g} of {cb['limit']:g} {cb['unit']} "
                     f"(settled {cb['settled']:g}, held for open requests {cb['held']:g})")
    if counters.get("error"):
        lines.append(f"counters {counters['error']}")
    print("\n".join(lines))
    return 0


def _read_block(source: str) -> Any:
    """The holder's block from a file or stdin ("-"): YAML or JSON (JSON is YAML)."""
    try:
        if source == "-":
            text = sys.stdin.read()
        else:
            with open(source, encoding="utf-8") as f:
                text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {source}: {exc}") from None
    try:
        block = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValueError(f"{source}: not valid YAML or JSON{where}") from None
    if not isinstance(block, dict):
        raise ValueError(f"{source}: expected a mapping (a `tenants:` entry of the policy "
                         f"file), got {type(block).__name__}")
    return block


def _set(args: argparse.Namespace) -> int:
    try:
        block = _read_block(args.file)
    except ValueError as exc:
        print(f"kt tenants set: {exc}", file=sys.stderr)
        return 2
    doc = admin_call(args, "tenants set", _path(args.name), method="PUT", body=block)
    _print(args, doc, f"{args.name}: set (overlay version {doc['overlay_version']})\n")
    return 0


def _delete(args: argparse.Namespace) -> int:
    query = "scope=overlay" if args.overlay_only else ""
    doc = admin_call(args, "tenants delete", _path(args.name), query, method="DELETE")
    what = "overlay entry dropped" if args.overlay_only else "deleted"
    _print(args, doc, f"{args.name}: {what} (overlay version {doc['overlay_version']})\n")
    return 0


def _freeze(args: argparse.Namespace) -> int:
    action = "freeze" if args.freeze else "unfreeze"
    body = {"reason": args.reason} if args.freeze and args.reason else None
    doc = admin_call(args, f"tenants {action}", _path(args.name, action), method="POST",
                     body=body if body is not None else {})
    done = "frozen" if args.freeze else "unfrozen"
    state = "already " + done if doc.get("unchanged") else done
    _print(args, doc, f"{args.name}: {state} (overlay version {doc['overlay_version']})\n")
    return 0


def _run(fn):
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except AdminFailed as failed:
            return failed.args[0]
    return run


def register(sub: Any) -> None:
    t = sub.add_parser("tenants", help="the holders of budgets and limits on a running "
                       "sidecar: list, get, set, delete, freeze, unfreeze (the admin port's "
                       "management API; docs/budgets.md)")
    tsub = t.add_subparsers(dest="tenants_command", required=True)
    ls = tsub.add_parser("list", help="the holders served, by name")
    client_args(ls)
    ls.add_argument("--limit", type=int, default=100, help="holders per page (1..1000)")
    ls.add_argument("--after", metavar="NAME", help="start after this name")
    ls.add_argument("--all", action="store_true", help="every page")
    ls.set_defaults(func=_run(_list))
    g = tsub.add_parser("get", help="a holder's policy in force, where it comes from, its "
                        "freeze mark and live counters")
    client_args(g)
    g.add_argument("name")
    g.set_defaults(func=_run(_get))
    s = tsub.add_parser("set", help="create or replace a holder's block (a `tenants:` entry, "
                        "YAML or JSON) in the overlay over the policy file")
    client_args(s)
    s.add_argument("name")
    s.add_argument("file", nargs="?", default="-", help="the block's file (default: stdin)")
    s.set_defaults(func=_run(_set))
    d = tsub.add_parser("delete", help="hide a holder (its requests get the defaults, or "
                        "are refused under unknown: deny)")
    client_args(d)
    d.add_argument("name")
    d.add_argument("--overlay-only", action="store_true",
                   help="drop only its overlay entry: the policy file's entry serves again")
    d.set_defaults(func=_run(_delete))
    f = tsub.add_parser("freeze", help="refuse every request of a holder (403, x-kt-reason: "
                        "frozen) until it is unfrozen")
    client_args(f)
    f.add_argument("name")
    f.add_argument("--reason", help="why (kept with the mark and in the audit event)")
    f.set_defaults(func=_run(_freeze), freeze=True)
    u = tsub.add_parser("unfreeze", help="stop refusing a frozen holder")
    client_args(u)
    u.add_argument("name")
    u.set_defaults(func=_run(_freeze), freeze=False, reason=None)
