"""Attribution below the budget holder: an end user's id and free tags, each read from a
request header that only a filter of the operator's may set (docs/budgets.md,
"Attribution"). The same trust model as the estimate header: unless the policy says
``attribution: {trusted: true}``, the headers are the client's own word and are ignored
here, and `kt envoy-config` strips them at the edge.

Every value is bounded where it enters: an id or tag too long, in a character outside
its set, or a tag beyond the count, is dropped (the request goes on, unattributed for
that value) and counted by field and why. None of them ever becomes a metric label: the
spend per user and tag is kept in the durable spend (``spend_model``), bounded per
tenant and day by ``SpendCap`` with an ``_other`` bucket."""
from __future__ import annotations

import re
from typing import Callable, Iterable, Mapping

import msgspec

USER_MAX_LEN = 128
TAG_MAX_LEN = 64
TAGS_MAX = 8
# a whole tags header longer than this is dropped before it is split
TAGS_HEADER_MAX_LEN = TAGS_MAX * (TAG_MAX_LEN + 2)
# ids and tags start with a letter or digit, so no value a client sends can be the
# overflow bucket's name (OTHER) nor begin like a spend cell of its own (SPEND_PREFIX)
_USER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,%d}" % (USER_MAX_LEN - 1))
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:=/-]{0,%d}" % (TAG_MAX_LEN - 1))
OTHER = "_other"
# a tags header as a well-behaved filter writes it (at most TAGS_MAX valid tags, commas
# and nothing else): read with one match instead of one per tag (the decision's path)
_TAGS_PLAIN = re.compile(r"{tag}(?:,{tag}){{0,{more}}}".format(
    tag=_TAG.pattern, more=TAGS_MAX - 1))

# the durable spend of a user or tag is a cell of its tenant's spend whose "model" is
# "~user|<id>" or "~tag|<tag>": a policy's model cannot start with "~" (policy/load.py)
SPEND_PREFIX = "~"

# what the spend of one tenant and UTC day may name, per dimension, in this process;
# past it a new id or tag is spent under OTHER (counted): a flood of invented user ids
# costs at most this many cells per tenant and day and replica
SPEND_VALUES_PER_TENANT_DAY = 10_000
# names remembered at once over every tenant (today's and yesterday's): past it every new
# name is spent under OTHER too, so the memory stays bounded (~120 bytes a name)
SPEND_NAMES_MAX = 200_000
# names of tenants the policy does not name (`unknown: defaults` lets a client invent
# tenants), all of them together, per UTC day: invented tenants cannot take the room of
# the tenants the operator named (they share this pool, outside SPEND_NAMES_MAX)
UNNAMED_TENANTS_NAMES_PER_DAY = 10_000


class AttributionConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True,
                        kw_only=True):
    """Policy ``attribution:`` (docs/policy.md)."""

    user_header: str = "x-kt-end-user"
    tags_header: str = "x-kt-tags"
    # a filter the operator runs sets these headers (a gateway that authenticates its end
    # users); else they are the client's word: ignored here, stripped by kt envoy-config
    trusted: bool = False


class Attribution(msgspec.Struct, frozen=True, gc=False):
    """Whom below its tenant a request is for (a Struct: a NamedTuple's construction cost
    four times as much, on the decision's path)."""

    user: str = ""
    tags: tuple[str, ...] = ()


NONE = Attribution()
Dropped = Callable[[str, str], None]  # (field: user | tags, why)


def _ignore(field: str, why: str) -> None:
    pass


def valid_user(user: str) -> bool:
    return _USER.fullmatch(user) is not None


def read(headers: Mapping[str, str], cfg: AttributionConfig,
         dropped: Dropped = _ignore) -> Attribution:
    """The request's attribution from its (lower-cased) headers; NONE unless trusted.
    ``dropped(field, why)`` is told of each value refused: ``too_long``, ``charset``,
    ``too_many`` (tags past TAGS_MAX)."""
    if not cfg.trusted:
        return NONE
    user = headers.get(cfg.user_header, "")
    text = headers.get(cfg.tags_header, "")
    if not user and not text:
        return NONE
    if text and (not user or _USER.fullmatch(user)) and _TAGS_PLAIN.fullmatch(text):
        tags = text.split(",")
        return Attribution(user, tuple(dict.fromkeys(tags)) if len(tags) > 1 else (text,))
    if len(text) > TAGS_HEADER_MAX_LEN:
        dropped("tags", "too_long")
        text = ""
    return bounded(user, text.split(",") if text else (), dropped)


def bounded(user: str, tags: Iterable[str], dropped: Dropped = _ignore) -> Attribution:
    """The values that pass their bounds (the others told to ``dropped``): a header's,
    or a usage report's (`POST /v1/usage` "user" and "tags")."""
    if user:
        if len(user) > USER_MAX_LEN:
            dropped("user", "too_long")
            user = ""
        elif not valid_user(user):
            dropped("user", "charset")
            user = ""
    kept: list[str] = []
    for raw in tags:
        tag = raw.strip()
        if not tag or tag in kept:
            continue
        if len(tag) > TAG_MAX_LEN:
            dropped("tags", "too_long")
        elif _TAG.fullmatch(tag) is None:
            dropped("tags", "charset")
        elif len(kept) >= TAGS_MAX:
            dropped("tags", "too_many")
        else:
            kept.append(tag)
    return Attribution(user, tuple(kept)) if user or kept else NONE


def joined(tags: tuple[str, ...]) -> str:
    """Tags as one string (a reservation keeps atomic values; a tag holds no comma)."""
    return ",".join(tags)


def split(text: str) -> tuple[str, ...]:
    return tuple(t for t in text.split(",") if t) if text else ()


def spend_model(dimension: str, value: str) -> str:
    """The spend cell's "model" of a user's or a tag's spend."""
    return f"{SPEND_PREFIX}{dimension}|{value}"


def of_spend_model(model: str) -> tuple[str, str]:
    """(dimension, value) of an attribution cell's "model"; ("", "") for a model's cell."""
    if not model.startswith(SPEND_PREFIX):
        return "", ""
    dimension, _, value = model[len(SPEND_PREFIX):].partition("|")
    return dimension, value


class SpendCap:
    """Which users and tags this process has written spend for, per tenant, UTC day and
    dimension, so that the store holds at most ``per_tenant_day`` of each per tenant and
    day (per replica): beyond, a new value's spend goes to OTHER and ``overflowed``
    counts it. Only today's and yesterday's names are kept (a cell of an older day is
    never written again), at most ``names_max`` of them: memory stays bounded whatever
    a client invents."""

    def __init__(self, per_tenant_day: int = SPEND_VALUES_PER_TENANT_DAY,
                 names_max: int = SPEND_NAMES_MAX,
                 unnamed_per_day: int = UNNAMED_TENANTS_NAMES_PER_DAY) -> None:
        self.per_tenant_day = per_tenant_day
        self.names_max = names_max
        self.unnamed_per_day = unnamed_per_day
        self._seen: dict[tuple[str, int, str], set[str]] = {}
        self._names = 0  # of the tenants the policy names
        self._unnamed: dict[int, int] = {}  # day -> names of the tenants it does not
        self._unnamed_keys: set[tuple[str, int, str]] = set()
        self._latest_day = 0
        self.overflowed = 0

    def __len__(self) -> int:
        return self._names + sum(self._unnamed.values())

    def admit(self, tenant: str, day: int, dimension: str, value: str,
              named: bool = True) -> str:
        """``value``, or OTHER when its tenant's day (or this process's memory) is full.
        ``named``: the policy names the tenant; tenants it does not name (invented under
        `unknown: defaults`) share one pool of ``unnamed_per_day`` names a day, so a flood
        of invented tenants never spends a named tenant's new users as OTHER."""
        if day > self._latest_day:
            self._latest_day = day
            for key in [k for k in self._seen if k[1] < day - 1]:
                gone = len(self._seen.pop(key))
                if key not in self._unnamed_keys:
                    self._names -= gone
                self._unnamed_keys.discard(key)
            for old in [d for d in self._unnamed if d < day - 1]:
                del self._unnamed[old]
        key = (tenant, day, dimension)
        seen = self._seen.get(key)
        if seen is not None and value in seen:
            return value
        full = (self._unnamed.get(day, 0) >= self.unnamed_per_day if not named
                else self._names >= self.names_max)
        if ((seen is not None and len(seen) >= self.per_tenant_day) or full
                or day < self._latest_day - 1):
            self.overflowed += 1
            return OTHER
        if seen is None:
            seen = self._seen[key] = set()
            if not named:
                self._unnamed_keys.add(key)
        seen.add(value)
        if named:
            self._names += 1
        else:
            self._unnamed[day] = self._unnamed.get(day, 0) + 1
        return value
