"""Durable, fleet-wide spend: per tenant, model and UTC day, kept by the backend where
the budget lives (Redis: the settle script's own hash, lua/ledger_spend.lua; embedded:
the state file), and the ``/v1/spend`` / ``kt spend`` report over any period.

A backend stores cells keyed (tenant, day, model) with six integer counts: requests,
input, output, cache read and cache write tokens, and cost in nano-USD. ``report``
sums them by period (day, month or the whole range), per tenant and model, or by one
of ``GROUP_KEYS`` (tenant, model, user, tag). A user's or a tag's spend is a cell of its
own whose "model" names it (sidecar/attribution.py): the same request counted again,
so only ``by=user|tag`` reads those cells, and every other sum leaves them out."""
from __future__ import annotations

import datetime
from typing import Callable, Iterable, Mapping, NamedTuple, Optional

from sidecar.attribution import of_spend_model

DAY_US = 86_400_000_000
KINDS = ("n", "i", "o", "cr", "cw", "c")  # the order of SpendRecord's counts
EPOCH_DATE = datetime.date(1970, 1, 1)


class SpendRecord(NamedTuple):
    """What one request adds to its tenant's spend."""

    model: str
    requests: int
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    cache_write_tokens: int
    cost_nano_usd: int

    def counts(self) -> tuple[int, int, int, int, int, int]:
        return (self.requests, self.input_tokens, self.output_tokens, self.cached_tokens,
                self.cache_write_tokens, self.cost_nano_usd)


class SpendCell(NamedTuple):
    tenant: str
    day: int  # whole UTC days since the epoch (HELD_DAY: a held cell)
    model: str
    counts: tuple[int, ...]  # KINDS order


# A held cell (docs/ledger.md, "Held"): what a tenant's budget holds for requests not
# settled yet and capacity leased and not returned, charged to the budget period starting
# at ``int(model)`` µs, in the budget's unit: counts == (amount,). A balance now, not
# spend of a day: every report shows it whatever its range.
HELD_DAY = -1
HELD_FIELD = "h"  # Redis: spend hash field "h|<period start µs>" (lua/common.lua held_add)


def held_cell(tenant: str, period_start_us: int, amount: int) -> SpendCell:
    return SpendCell(tenant, HELD_DAY, str(period_start_us), (amount,))


def attributed(cell: SpendCell) -> bool:
    """A user's or a tag's cell (the request's spend again, under its attribution)."""
    return of_spend_model(cell.model)[0] != ""


def _attribution_key(dimension: str) -> Callable[[SpendCell], Optional[str]]:
    def key(cell: SpendCell) -> Optional[str]:
        named, value = of_spend_model(cell.model)
        return value if named == dimension else None
    return key


# `/v1/spend?by=KEY`, `kt spend --by KEY`: the group a cell's spend counts under (None:
# not counted by that key). One line per key: the hierarchy's team will be one more,
# a tenant's parent under the policy in force (a key that needs the policy is given
# to ``report`` by its caller, beside these).
GROUP_KEYS: dict[str, Callable[[SpendCell], Optional[str]]] = {
    "tenant": lambda cell: None if attributed(cell) else cell.tenant,
    "model": lambda cell: None if attributed(cell) else cell.model,
    "user": _attribution_key("user"),
    "tag": _attribution_key("tag"),
}


def in_range(cell: SpendCell, since_day: int, until_day: int) -> bool:
    """Whether a report over ``since_day..until_day`` counts ``cell`` (held: always)."""
    return cell.day == HELD_DAY or since_day <= cell.day <= until_day


def day_of(us: int) -> int:
    return us // DAY_US


def date_of(day: int) -> datetime.date:
    return EPOCH_DATE + datetime.timedelta(days=day)


def day_number(d: datetime.date) -> int:
    return (d - EPOCH_DATE).days


def parse_day(text: str) -> int:
    """"2026-11-30" -> day number; ValueError with a clear message."""
    try:
        return day_number(datetime.date.fromisoformat(text))
    except ValueError:
        raise ValueError(f"expected a date YYYY-MM-DD, got {text[:40]!r}") from None


def period_key(day: int, period: str) -> str:
    d = date_of(day)
    if period == "day":
        return d.isoformat()
    if period == "month":
        return f"{d.year:04d}-{d.month:02d}"
    return "total"


def _row(counts: Iterable[int]) -> dict:
    n, i, o, cr, cw, c = counts
    return {"requests": n, "input_tokens": i, "output_tokens": o, "cached_tokens": cr,
            "cache_write_tokens": cw, "cost_nano_usd": c, "usd": c / 1e9}


def _iso_us(us: int) -> str:
    return (datetime.datetime(1970, 1, 1) + datetime.timedelta(microseconds=us)).isoformat(
        timespec="seconds") + "Z"


def report(cells: Iterable[SpendCell], since_day: int, until_day: int, period: str,
           source: str, budget_unit: Optional[Callable[[str], str]] = None,
           by: Optional[str] = None,
           group_keys: Mapping[str, Callable[[SpendCell], Optional[str]]] = GROUP_KEYS,
           tenant: Optional[str] = None) -> dict:
    """The /v1/spend document. ``until_day`` is inclusive. With period "total" the shape is
    tenants -> model -> counts; with "day" / "month", tenants -> period -> model -> counts.
    Beside it, ``held``: tenant -> {amount, unit, periods: {budget period start (UTC ISO):
    amount}}, what each budget holds now for requests not settled yet and leased capacity
    (in the unit ``budget_unit(tenant)`` names, "usd" = nano-USD); settled + held = what
    the budget holds.
    ``by`` (a key of ``group_keys``): instead of ``tenants``, ``"by": by`` and
    ``groups``: group -> counts (period "total") or group -> period -> counts; users and
    tags past a tenant's daily cap are one group, ``_other``. ``tenant``: that tenant's
    cells only (and its held amount), e.g. its own users."""
    group_of = group_keys[by] if by is not None else None
    groups: dict[str, dict[str, list[int]]] = {}
    acc: dict[str, dict[str, dict[str, list[int]]]] = {}
    held: dict[str, dict[int, int]] = {}
    for cell in cells:
        if tenant is not None and cell.tenant != tenant:
            continue
        if cell.day == HELD_DAY:
            if cell.counts[0]:
                holds = held.setdefault(cell.tenant, {})
                holds[int(cell.model)] = holds.get(int(cell.model), 0) + cell.counts[0]
            continue
        if not since_day <= cell.day <= until_day:
            continue
        if group_of is not None:
            group = group_of(cell)
            if group is not None:
                into = groups.setdefault(group, {}).setdefault(period_key(cell.day, period),
                                                                [0] * 6)
                for k, v in enumerate(cell.counts):
                    into[k] += v
            continue
        if attributed(cell):
            continue
        slot = acc.setdefault(cell.tenant, {}).setdefault(period_key(cell.day, period), {})
        cur = slot.setdefault(cell.model, [0] * 6)
        for k, v in enumerate(cell.counts):
            cur[k] += v
    tenants: dict = {}
    for name, periods in sorted(acc.items()):
        if period == "total":
            tenants[name] = {m: _row(c) for m, c in sorted(periods.get("total", {}).items())}
        else:
            tenants[name] = {p: {m: _row(c) for m, c in sorted(models.items())}
                             for p, models in sorted(periods.items())}
    held_doc = {}
    for name, holds in sorted(held.items()):
        unit = budget_unit(name) if budget_unit is not None else ""
        amount = sum(holds.values())
        row: dict = {"amount": amount, "unit": unit,
                     "periods": {_iso_us(ps): a for ps, a in sorted(holds.items())}}
        if unit == "usd":
            row["usd"] = amount / 1e9
        held_doc[name] = row
    doc: dict = {"since": date_of(since_day).isoformat(), "until": date_of(until_day).isoformat(),
           "period": period, "source": source, "held": held_doc}
    if tenant is not None:
        doc["tenant"] = tenant
    if group_of is None:
        doc["tenants"] = tenants
        return doc
    doc["by"] = by
    doc["groups"] = {
        g: (_row(periods["total"]) if period == "total"
            else {p: _row(c) for p, c in sorted(periods.items())})
        for g, periods in sorted(groups.items())}
    return doc


LAST_DAY = 2_932_896  # 9999-12-31


class SpendQuery(NamedTuple):
    since_day: int
    until_day: int  # included
    period: str  # day, month, total
    by: Optional[str] = None  # a group key; None: per tenant and model
    tenant: Optional[str] = None  # one tenant's cells only (its users, its tags...)


def parse_query(query: dict[str, list[str]],
                group_keys: Iterable[str] = GROUP_KEYS) -> SpendQuery:
    """/v1/spend's query string; ValueError if bad. Defaults: everything kept, one total
    per tenant and model, every tenant."""
    def one(name: str) -> Optional[str]:
        values = query.get(name)
        return values[-1] if values else None

    period = one("period") or "total"
    if period not in ("day", "month", "total"):
        raise ValueError(f"period must be day, month or total, got {period[:20]!r}")
    since_s, until_s = one("since"), one("until")
    since = parse_day(since_s) if since_s else 0
    until = parse_day(until_s) if until_s else LAST_DAY
    if until < since:
        raise ValueError("until is before since")
    by = one("by")
    keys = sorted(group_keys)
    if by is not None and by not in keys:
        raise ValueError(f"by must be one of {', '.join(keys)}, got {by[:20]!r}")
    return SpendQuery(since, until, period, by, one("tenant") or None)


def cells_from_fields(tenant: str, fields: dict) -> list[SpendCell]:
    """A Redis spend hash ("<day>|<kind>|<model>" -> count, "h|<period start>" -> held)
    as cells."""
    acc: dict[tuple[int, str], list[int]] = {}
    held: list[SpendCell] = []
    for raw_key, raw_value in fields.items():
        key = raw_key.decode() if isinstance(raw_key, bytes) else raw_key
        day_s, sep, rest = key.partition("|")
        if day_s == HELD_FIELD:
            try:
                held.append(held_cell(tenant, int(rest), int(raw_value)))
            except ValueError:
                pass
            continue
        kind, sep2, model = rest.partition("|")
        if not sep or not sep2 or kind not in KINDS:
            continue
        try:
            day, value = int(day_s), int(raw_value)
        except ValueError:
            continue
        acc.setdefault((day, model), [0] * 6)[KINDS.index(kind)] += value
    return [SpendCell(tenant, d, m, tuple(c)) for (d, m), c in acc.items()] + held
