"""Budget holders (docs/budgets.md): a tenant's `parent`, its several budget windows and its
per-model limits, compiled into the path of cells a request is decided on.

A cell is one (limits, one budget window) pair with its own state: a holder's first cell
carries its limits and its first window (its state is the holder's own, as a flat tenant's
is), each further window is a cell of its own, each model entry adds cells, and the parent's
cells follow, up to the root. ``_core.decide_path`` decides a path all or nothing; a
tenant whose path would be its own cell alone keeps ``path`` None and is decided exactly as
before (the fast path). Here: the checks (unknown parent, cycle, depth, the windows of one
holder) and the compilation; load.py calls ``compile_paths`` with its own limit checks.
"""
from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone
from typing import Callable, Optional
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from sidecar import _core
from sidecar.policy import schema

# levels from a tenant to its root, itself included (the issue asks for at least four)
MAX_DEPTH = 8

Path_ = tuple  # load.py's: field names, and list indexes as ints
# (where, limits, budget) -> (compiled limits, budget unit) or None (its error reported)
BuildLimits = Callable[[Path_, schema.Limits, Optional[schema.Budget]],
                       Optional[tuple[_core.Limits, str]]]
Fail = Callable[[Path_, str], None]


class PathCell(msgspec.Struct, frozen=True, gc=False):
    """One cell of a path: whose it is and what it holds (for the answer's reason and
    message, which name the holder and never its figures), its state's id, its limits."""

    id: str  # the holder's name for its first cell, else "<holder>{<what>}"
    holder: str
    label: str  # e.g. "usd budget per week", "gpt-4o limits"
    unit: str  # "tokens", "usd" or "" (no budget)
    limits: _core.Limits
    # a calendar window (P_WINDOW: a time zone, an anchor), shared by the cells of one
    # Limits: its bounds are set on them before each decision (refresh_windows)
    calendar: Optional["Calendar"] = None


class HolderPath(msgspec.Struct, frozen=True, gc=False):
    """The cells one request of a tenant is decided on, the tenant's own first; ``root``
    names the tree (its hash tag on Redis). Immutable: a reservation keeps the path it
    was charged on, and its settlement moves exactly those cells."""

    root: str
    cells: tuple[PathCell, ...]


class PathCharge(msgspec.Struct, frozen=True, gc=False):
    """What a decision on a path charged: the path itself and, per cell, (cost charged in
    its unit, the period start of the charge) (Outcome.charges). A reservation keeps it, so
    its settlement moves the cells it was charged on whatever the policy says by then."""

    path: HolderPath
    charges: tuple[tuple[int, int], ...]


class PathSettlement(msgspec.Struct, frozen=True, gc=False):
    """A settlement of a path: per cell (its cost difference in its own unit, the period
    start of its charge; -1: the current period). The backends settle every cell by the
    same token difference and these."""

    path: HolderPath
    deltas: tuple[tuple[int, int], ...]


def path_deltas(path: HolderPath, charges: tuple[tuple[int, int], ...], actual_tokens: int,
                actual_nano: int) -> PathSettlement:
    """What each cell must move by when usage is known: the actual cost in the cell's unit
    less what the decision charged it (``charges``: Outcome.charges)."""
    deltas = []
    for cell, (charged, period_start) in zip(path.cells, charges, strict=True):
        if cell.limits.budget < 0:
            deltas.append((0, period_start))
            continue
        actual = actual_nano if cell.limits.budget_in_usd else actual_tokens
        deltas.append((actual - charged, period_start))
    return PathSettlement(path, tuple(deltas))


def _windows(where: Path_, budget: Optional[schema.Budget],
             budgets: Optional[list[schema.Budget]], fail: Fail) -> list[schema.Budget]:
    if budget is not None and budgets is not None:
        fail(where + ("budgets",), "set `budget` (one window) or `budgets` (several), not both")
        return []
    if budgets is None:
        return [budget] if budget is not None else []
    if not budgets:
        fail(where + ("budgets",), "list at least one budget (or leave `budgets` out)")
    seen: set[tuple[bool, str]] = set()
    for i, b in enumerate(budgets):
        key = (b.usd is not None, b.period)
        if key in seen:
            fail(where + ("budgets", i), f"a second {'usd' if key[0] else 'tokens'} "
                 f"budget per {b.period}: one window per unit and period")
        seen.add(key)
    return list(budgets)


def _label(model: str, b: Optional[schema.Budget], has_limits: bool) -> str:
    head = f"{model} " if model else ""
    if b is None:
        return head + "limits" if has_limits or head else "limits"
    unit = "usd" if b.usd is not None else "tokens"
    return f"{head}{unit} budget per {b.period}" if b.period != "total" else f"{head}{unit} budget"


def _window_id(b: schema.Budget) -> str:
    return f"{'usd' if b.usd is not None else 'tokens'}-{b.period}"


class _Holder:
    """One holder's compiled cells: its own (overall) and per model."""

    __slots__ = ("own", "models")

    def __init__(self) -> None:
        self.own: tuple[PathCell, ...] = ()
        self.models: dict[str, list[PathCell]] = {}


_calendars: dict[_core.Limits, "Calendar"] = {}


def _calendar(limits: _core.Limits, b: Optional[schema.Budget]) -> Optional["Calendar"]:
    """The Calendar of a P_WINDOW cell: one per compiled Limits (interned by its budget,
    calendar included, so every cell sharing it shares its window)."""
    if b is None or limits.period != _core.P_WINDOW:
        return None
    cal = _calendars.get(limits)
    if cal is None:
        if len(_calendars) > 100_000:  # reloads make new Limits: forget old ones
            _calendars.clear()
        cal = _calendars[limits] = Calendar(b)
    return cal


def _cells(name: str, model: str, id_base: str, lim: schema.Limits,
           windows: list[schema.Budget], where: Path_, build: BuildLimits,
           keep_empty: bool) -> Optional[list[PathCell]]:
    """The cells of one set of limits and windows: the first window with the limits,
    each further window alone. None when one failed to compile (its error reported)."""
    out: list[PathCell] = []
    has_limits = bool(lim.rpm or lim.tpm)
    first = windows[0] if windows else None
    built = build(where, lim, first)
    if built is None:
        return None
    if has_limits or first is not None or keep_empty:
        out.append(PathCell(id=id_base, holder=name, label=_label(model, first, has_limits),
                            unit=built[1], limits=built[0],
                            calendar=_calendar(built[0], first)))
    for b in windows[1:]:
        more = build(where, schema.Limits(), b)
        if more is None:
            return None
        out.append(PathCell(id=f"{id_base}{{{_window_id(b)}}}" if model == "" else
                            f"{id_base[:-1]}:{_window_id(b)}}}",
                            holder=name, label=_label(model, b, False), unit=more[1],
                            limits=more[0], calendar=_calendar(more[0], b)))
    return out


def tree_members(tenants: dict[str, schema.TenantPolicy]) -> set[str]:
    """Holders in a tree: those with a parent and those named as one. They hold only what
    they declare (the defaults fill in for flat tenants alone: a team must not be capped
    at a key's default rate)."""
    members: set[str] = set()
    for name, t in tenants.items():
        if t.parent is not None:
            members.add(name)
            members.add(t.parent)
    return members


def compile_paths(tenants: dict[str, schema.TenantPolicy], flat_limits: Callable[[str], schema.Limits],
                  flat_budget: Callable[[str], Optional[schema.Budget]], build: BuildLimits,
                  fail: Fail, has_providers: bool
                  ) -> tuple[dict[str, tuple[Optional[HolderPath], Optional[dict[str, HolderPath]]]],
                             set[str]]:
    """Per tenant that needs one: (its path for any model, or None when that is its own
    cell alone; its paths by model, or None); and the tenants handled here (their own
    fields checked here: one that is handled and absent had an error). Errors (unknown
    parent, a cycle, too deep, too many cells, windows of one holder) go to ``fail`` with
    their field path."""
    members = tree_members(tenants)
    needs = {n for n, t in tenants.items()
             if n in members or t.budgets is not None or t.models
             or (t.budget is not None and is_calendar(t.budget))}
    if not needs:
        return {}, needs
    if has_providers:
        fail(("tenants",), "`parent`, `budgets` and `models` cannot be used with `providers` "
             "yet (docs/budgets.md)")
        return {}, needs
    ok = True
    # parents: known, no cycle (each reported once), not too deep. depth[h]: levels from h
    # to its root, h included, once its chain is known to be sound (each holder walked once)
    depth: dict[str, int] = {}
    cycles: set[frozenset[str]] = set()
    for name in tenants:  # in the file's order: the same errors, in the same order, each load
        if name in depth or name not in members:
            continue
        chain = [name]
        on_chain = {name}
        at: Optional[str] = tenants[name].parent
        bad = False
        while at is not None and at not in depth:
            if at not in tenants:
                fail(("tenants", chain[-1], "parent"), f"unknown holder {at!r}: a parent must "
                     "be an entry of `tenants` (a team or org may have no limits of its own)")
                bad = True
                break
            if at in on_chain:
                loop = chain[chain.index(at):]
                if frozenset(loop) not in cycles:
                    cycles.add(frozenset(loop))
                    fail(("tenants", at, "parent"), "a cycle of parents: " + " -> ".join(
                        loop + [at]))
                bad = True
                break
            chain.append(at)
            on_chain.add(at)
            at = tenants[at].parent
        if bad:
            ok = False
            for h in chain:
                depth[h] = -1  # reported: not walked again
            continue
        base_depth = depth[at] if at is not None else 0
        if base_depth < 0:
            ok = False
            for h in chain:
                depth[h] = -1
            continue
        for i, h in enumerate(reversed(chain)):
            depth[h] = base_depth + i + 1
            if depth[h] > MAX_DEPTH:
                fail(("tenants", h, "parent"), f"more than {MAX_DEPTH} levels of parents")
                ok = False
    holders: dict[str, _Holder] = {}

    def holder(name: str) -> Optional[_Holder]:
        h = holders.get(name)
        if h is not None:
            return h
        t = tenants[name]
        where: Path_ = ("tenants", name)
        h = _Holder()
        if name in members:
            lim, windows = t.limits or schema.Limits(), _windows(where, t.budget, t.budgets, fail)
        else:  # a flat tenant: the defaults fill in, as for any flat tenant
            lim = flat_limits(name)
            windows = _windows(where, t.budget if t.budgets is not None else flat_budget(name),
                               t.budgets, fail)
        own = _cells(name, "", name, lim, windows, where, build, keep_empty=True)
        if own is None:
            return None
        h.own = tuple(own)
        for model, m in (t.models or {}).items():
            mwhere = where + ("models", model)
            if not model or "{" in model or "}" in model:
                fail(mwhere, "a model name must be non-empty and without braces")
                return None
            cells = _cells(name, model, f"{name}{{m:{model}}}", m.limits or schema.Limits(),
                           _windows(mwhere, m.budget, m.budgets, fail), mwhere, build,
                           keep_empty=False)
            if cells is None:
                return None
            if cells:
                h.models[model] = cells
        holders[name] = h
        return h

    out: dict[str, tuple[Optional[HolderPath], Optional[dict[str, HolderPath]]]] = {}
    if not ok:
        # the file fails: its tenants are checked as flat ones, so their own errors are
        # reported too (every error in one run)
        return out, set()
    # above a holder: its parent's cells and theirs, up to the root (computed once per
    # parent: 100,000 keys under 1,000 teams walk each team once)
    above: dict[str, tuple[str, tuple[PathCell, ...], tuple[_Holder, ...], bool]] = {}

    def chain_above(name: str
                    ) -> Optional[tuple[str, tuple[PathCell, ...], tuple[_Holder, ...], bool]]:
        """(root, the cells of ``name`` and every holder above it, those holders, whether
        any of them has model cells)."""
        got = above.get(name)
        if got is not None:
            return got
        h = holder(name)
        if h is None:
            return None
        own = tuple(c for c in h.own if _has_any(c))
        parent = tenants[name].parent
        if parent is None:
            got = (name, own, (h,), bool(h.models))
        else:
            up = chain_above(parent)
            if up is None:
                return None
            got = (up[0], own + up[1], (h,) + up[2], bool(h.models) or up[3])
        above[name] = got
        return got

    for name in tenants:
        if name not in needs:
            continue
        mine = holder(name)
        if mine is None:
            continue
        parent = tenants[name].parent
        up = chain_above(parent) if parent is not None else (name, (), (), False)
        if up is None:
            continue
        root, upper, above_me, models_above = up
        default = mine.own + upper
        if len(default) > _core.MAX_PATH:
            fail(("tenants", name), f"its path holds {len(default)} cells (windows, models "
                 f"and parents): at most {_core.MAX_PATH}")
            continue
        # every member of a tree is decided on the tree's cells, even alone on its path:
        # its cells are shared with the paths of the holders below it
        # (a calendar window too: only the path scripts take one)
        base = HolderPath(root, default) if (
            name in members or len(default) > 1
            or any(c.calendar is not None for c in default)) else None
        if not (mine.models or models_above):
            out[name] = (base, None)
            continue
        by_model: dict[str, HolderPath] = {}
        for model in sorted({m for x in (mine, *above_me) for m in x.models}):
            cells: list[PathCell] = list(mine.own) + mine.models.get(model, [])
            for x in above_me:
                cells += [c for c in x.own if _has_any(c)] + x.models.get(model, [])
            if len(cells) > _core.MAX_PATH:
                fail(("tenants", name, "models", model), f"its path holds {len(cells)} cells: "
                     f"at most {_core.MAX_PATH}")
                continue
            by_model[model] = HolderPath(root, tuple(cells))
        out[name] = (base, by_model or None)
    return out, needs


def _has_any(cell: PathCell) -> bool:
    lim = cell.limits
    return lim.rpm > 0 or lim.tpm > 0 or lim.budget >= 0


# --- calendar windows: a time zone, a billing anchor (docs/budgets.md) --------------------
WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_US = timedelta(microseconds=1)


def is_calendar(b: schema.Budget) -> bool:
    """A window the core cannot compute from the clock alone."""
    return b.timezone is not None or b.start_day is not None or b.start_weekday is not None


def calendar_problem(b: schema.Budget) -> Optional[tuple[str, str]]:
    """(field, what is wrong) of a budget's calendar settings, or None."""
    if not is_calendar(b):
        return None
    if b.period not in ("day", "week", "month"):
        return "period", f"a time zone or start applies to day, week and month, not {b.period}"
    if b.start_day is not None and (b.period != "month" or not 1 <= b.start_day <= 28):
        return "start_day", "a month's start day: 1..28, with period month"
    if b.start_weekday is not None and b.period != "week":
        return "start_weekday", "a week's first day, with period week"
    if b.timezone is not None:
        try:
            ZoneInfo(b.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            return "timezone", f"unknown IANA time zone {b.timezone!r} (e.g. Europe/Berlin)"
    return None


class Calendar:
    """A day, week or month that starts at local midnight in a time zone, on a chosen day:
    the window holding an instant and the next one's end, in µs since the epoch (the core's
    P_WINDOW takes them, Limits.set_window). Computed from the clock (zoneinfo: daylight
    saving changes make a day 23 or 25 hours long), no reset job; cached until it ends."""

    __slots__ = ("period", "tz", "start_day", "weekday", "_cached")

    def __init__(self, b: schema.Budget) -> None:
        self.period = b.period
        self.tz = ZoneInfo(b.timezone) if b.timezone is not None else timezone.utc
        self.start_day = b.start_day or 1
        self.weekday = WEEKDAYS.index(b.start_weekday or "monday")
        self._cached: tuple[int, int, int] = (0, 0, 0)

    def _first(self, d: date) -> date:
        """The first local day of the window holding day ``d``."""
        if self.period == "day":
            return d
        if self.period == "week":
            return d - timedelta(days=(d.weekday() - self.weekday) % 7)
        if d.day >= self.start_day:
            return d.replace(day=self.start_day)
        y, m = (d.year - 1, 12) if d.month == 1 else (d.year, d.month - 1)
        return date(y, m, self.start_day)

    def _after(self, first: date) -> date:
        """The first local day of the window after the one starting on ``first``."""
        if self.period == "day":
            return first + timedelta(days=1)
        if self.period == "week":
            return first + timedelta(days=7)
        y, m = (first.year + 1, 1) if first.month == 12 else (first.year, first.month + 1)
        return date(y, m, self.start_day)

    def _instant(self, d: date) -> int:
        """Local midnight starting day ``d``, in µs since the epoch."""
        return (datetime.combine(d, time(0), tzinfo=self.tz) - _EPOCH) // _US

    def window(self, now_us: int) -> tuple[int, int, int]:
        """(start, end) of the window holding ``now_us``, and the next window's end."""
        c = self._cached
        if c[0] <= now_us < c[1]:
            return c
        local = datetime.fromtimestamp(now_us // 1_000_000, self.tz).date()
        first = self._first(local)
        second = self._after(first)
        c = self._cached = (self._instant(first), self._instant(second),
                            self._instant(self._after(second)))
        return c


def refresh_windows(path: HolderPath, clock: Callable[[], int]) -> None:
    """Give each calendar cell of ``path`` the window holding the time ``clock`` tells
    (read only when the path has one), before the core or the scripts decide or settle."""
    now_us = -1
    for c in path.cells:
        if c.calendar is not None:
            if now_us < 0:
                now_us = clock()
            c.limits.set_window(*c.calendar.window(now_us))
