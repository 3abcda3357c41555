"""The reservation book: what each admitted request was charged, kept until its usage is
known, and the record format a reservation is shared in between replicas.

The decision flow puts a reservation in the book; the settlement flow takes it out (its
usage came, or it could not be read) or is told when it expires unsettled."""
from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

from sidecar.policy.holders import PathCharge

log = logging.getLogger("kt.book")

# An unsettled reservation is forgotten after this long, or when this many are open
# (oldest first): it is then charged at its bound. A gateway without ext_proc or usage
# reports never settles, so the book must stay small and cheap for the GC.
RESERVATION_TTL_S = 600.0
RESERVATIONS_MAX = 100_000
# The reservation key of a request Envoy's own failure mode let through (no answer of
# ours reached Envoy, so no reservation id did): its x-request-id, under this prefix so it
# can never collide with a reservation id the sidecar made.
REQUEST_ID_KEY = "x-request-id:"


def reservation_key(reservation_id: str, request_id: str) -> str:
    """Where a finished request's reservation is held: under the id the sidecar made
    (x-kt-reservation), else, when Envoy's own failure mode let the request through and
    no answer of ours reached it, under its x-request-id (REQUEST_ID_KEY)."""
    if reservation_id:
        return reservation_id
    return REQUEST_ID_KEY + request_id if request_id else ""


class ReservationIds:
    """Reservation ids the sidecar makes, so a client cannot pick (or replay) the id its
    settlement is keyed by: 96 random bits each, unguessable and unique across replicas
    sharing one Redis. Drawn from a pool of random bytes refilled every 256 ids (one
    `os.urandom` per id would cost more than the rest of the id's handling)."""

    _BATCH = 256

    def __init__(self) -> None:
        self._pool: list[str] = []

    def next(self) -> str:
        try:
            return self._pool.pop()
        except IndexError:
            raw = os.urandom(12 * self._BATCH).hex()
            self._pool.extend(raw[i:i + 24] for i in range(0, len(raw), 24))
            return self._pool.pop()


@dataclass(frozen=True)
class Reservation:
    """What an admitted request was charged, kept until its usage is known."""

    tenant: str
    tier: int
    model: str
    charged_tokens: int
    charged_cost: int
    period_start_us: int
    created_s: float
    model_asked: str = ""  # for the ledger: what the request asked for, and the answer
    decision: str = ""
    provider: str = ""  # the provider charged too (docs/providers.md): settled with it
    # what it is charged at if its usage cannot be read (sidecar/settlement/bound.py);
    # output -1: not known when it was made (a late decision reply)
    bound_input: int = 0
    bound_output: int = -1
    # the input a stored conversation may add (a Responses previous_response_id): the
    # bound's input is the larger of this and bound_input (sidecar/settlement/bound.py)
    stored_input: int = 0
    # attribution below the tenant (sidecar/attribution.py): the end user, and the tags
    # joined by commas (atomic values keep the book's tuples untracked by the GC)
    user: str = ""
    tags: str = ""
    # a decision over a path of cells (docs/budgets.md): the path and each cell's charge,
    # settled as recorded whatever the policy says by then; None: the tenant's own limits
    path_charge: Optional[PathCharge] = None


# a shared reservation's provider field (provider ids are [A-Za-z0-9._-], never "|"), and
# its bound (sidecar/settlement/bound.py: "<input>,<output>")
_PROVIDER_FIELD = "p="
_BOUND_FIELD = "b="
# its attribution: "a=<user>;<tags>" (sidecar/attribution.py's character sets hold neither
# ";" nor "|")
_ATTRIBUTION_FIELD = "a="


def reservation_record(tier: int, model: str, tokens: int, cost: int, period_start: int,
                       provider: str = "", bound_input: int = 0,
                       bound_output: int = -1, stored_input: int = 0, user: str = "",
                       tags: str = "") -> str:
    """A reservation as shared through the backend (model last: it may hold any character).
    Its bound (`b=<input>,<output>`), so the replica that learns its usage cannot be read
    charges it; with providers, the provider charged too (`p=<id>` before the model): the
    replica that settles corrects that provider's bucket and names it in the ledger."""
    head = f"{tier}|{tokens}|{cost}|{period_start}|"
    if bound_output >= 0:
        head += f"{_BOUND_FIELD}{bound_input},{bound_output}" + (
            f",{stored_input}|" if stored_input else "|")
    if provider:
        head += f"{_PROVIDER_FIELD}{provider}|"
    if user or tags:
        head += f"{_ATTRIBUTION_FIELD}{user};{tags}|"
    return head + model


def parse_reservation(tenant: str, record: Optional[str]) -> Optional[Reservation]:
    """A shared record read back (None: none, or malformed: logged)."""
    if record is None:
        return None
    try:
        tier, tokens, cost, period_start, model = record.split("|", 4)
        bound_input, bound_output, stored_input = 0, -1, 0
        if model.startswith(_BOUND_FIELD) and "|" in model:
            bounds, model = model[len(_BOUND_FIELD):].split("|", 1)
            text_in, text_out, *stored = bounds.split(",", 2)
            bound_input, bound_output = int(text_in), int(text_out)
            stored_input = int(stored[0]) if stored else 0
        provider = ""
        if model.startswith(_PROVIDER_FIELD) and "|" in model:
            provider, model = model[len(_PROVIDER_FIELD):].split("|", 1)
        user = tags = ""
        if model.startswith(_ATTRIBUTION_FIELD) and "|" in model:
            att, model = model[len(_ATTRIBUTION_FIELD):].split("|", 1)
            user, _, tags = att.partition(";")
        return Reservation(tenant, int(tier), model, int(tokens), int(cost), int(period_start),
                           time.monotonic(), provider=provider, bound_input=bound_input,
                           bound_output=bound_output, stored_input=stored_input, user=user,
                           tags=tags)
    except ValueError:
        log.warning("ignoring a malformed shared reservation for tenant %s: %r", tenant,
                    record[:200])
        return None


class ReservationBook:
    """Reservations by request id, oldest first; bounded in size and age, so none leaks.

    Entries are kept as plain tuples of atomic values: the garbage collector stops
    tracking those, so a full book costs the collector nothing (a dataclass per entry
    made every full collection walk 100,000 objects)."""

    def __init__(self, ttl_s: float = RESERVATION_TTL_S, max_entries: int = RESERVATIONS_MAX,
                 clock=time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.clock = clock
        self._book: OrderedDict[str, tuple] = OrderedDict()
        self.expired = 0
        # told of each reservation forgotten unsettled (the settlement flow charges it)
        self.on_expired: Optional[Callable[[str, Reservation], None]] = None

    def __len__(self) -> int:
        return len(self._book)

    def put(self, request_id: str, tenant: str, tier: int, model: str, charged_tokens: int,
            charged_cost: int, period_start_us: int, created_s: float, model_asked: str = "",
            decision: str = "", provider: str = "", bound_input: int = 0,
            bound_output: int = -1, stored_input: int = 0, user: str = "",
            tags: str = "", path_charge: Optional[PathCharge] = None) -> None:
        self._book[request_id] = (tenant, tier, model, charged_tokens, charged_cost,
                                  period_start_us, created_s, model_asked, decision, provider,
                                  bound_input, bound_output, stored_input, user, tags,
                                  path_charge)
        self._book.move_to_end(request_id)
        self.expire()

    def open_ids(self) -> list[str]:
        """The ids of the reservations open now, oldest first."""
        return list(self._book)

    def pop(self, request_id: str) -> Optional[Reservation]:
        t = self._book.pop(request_id, None)
        return Reservation(*t) if t is not None else None

    def get(self, request_id: str) -> Optional[Reservation]:
        t = self._book.get(request_id)
        return Reservation(*t) if t is not None else None

    def expire(self) -> int:
        """Close reservations past their age now (a timer calls this: a decision does it
        too, but a quiet sidecar must still close them on time)."""
        limit = self.clock() - self.ttl_s
        n = 0
        book = self._book
        while book:
            first = next(iter(book.values()))
            if first[6] >= limit and len(book) <= self.max_entries:
                break
            request_id, entry = book.popitem(last=False)
            n += 1
            if self.on_expired is not None:
                self.on_expired(request_id, Reservation(*entry))
        self.expired += n
        return n
