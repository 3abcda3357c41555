"""Every key the Redis backend writes, named once (docs/redis.md, Keys).

Every key of a tenant carries the hash tag ``{tenant}``: all of them sit in one cluster
slot, so each script call runs on one node. A provider's keys carry ``{provider}`` under
``prov:``, which no tenant's key can start with.
"""
from __future__ import annotations


class Keys:
    __slots__ = ("prefix", "marker", "lease_ends")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        # the key whose disappearance shows the store lost its data (marker.py), outside
        # every tenant's {hash tag}
        self.marker = f"{prefix}:store-marker"
        # "<tenant> <lease id>" by end: leases not known returned (lease.py); one key, not
        # in a tenant's slot: a hint written after the lease, not part of its record
        self.lease_ends = f"{prefix}:lease-ends"

    def tag(self, tenant: str) -> str:
        return f"{self.prefix}:{{{tenant}}}"

    def tenant(self, tenant: str) -> tuple[str, str, str]:
        """The tenant's request bucket, token bucket and budget (decide.lua's KEYS)."""
        tag = self.tag(tenant)
        return f"{tag}:rpm", f"{tag}:tpm", f"{tag}:budget"

    def cell(self, root: str, cell: str) -> str:
        """A cell of a holder tree (docs/budgets.md; lua/cell.lua): its buckets and budget in
        one string, under the ROOT's hash tag so a whole tree is one slot, one script call
        and one MGET. A holder's cells are new keys when it joins a tree (its flat keys
        are not read)."""
        return f"{self.tag(root)}:c:{cell}"

    def path_settled(self, root: str, tenant: str, request_id: str) -> str:
        """A path settlement's marker, in the tree's slot (a cluster settles there)."""
        return f"{self.tag(root)}:settled:{tenant}:{request_id}"

    def settled(self, tenant: str, request_id: str) -> str:
        return f"{self.tag(tenant)}:settled:{request_id}"

    def reservation(self, tenant: str, request_id: str) -> str:
        return f"{self.tag(tenant)}:reserved:{request_id}"

    def spend(self, tenant: str) -> str:
        return f"{self.tag(tenant)}:spend"

    def lease_call(self, tenant: str, call_id: str) -> str:
        return f"{self.tag(tenant)}:lease-call:{call_id}"

    def leases(self, tenant: str) -> str:
        return f"{self.tag(tenant)}:leases"

    def provider(self, provider: str) -> tuple[str, str, str]:
        tag = f"{self.prefix}:prov:{{{provider}}}"
        return f"{tag}:rpm", f"{tag}:tpm", f"{tag}:rpd"

    def provider_settled(self, provider: str, marker: str) -> str:
        return f"{self.prefix}:prov:{{{provider}}}:settled:{marker}"
