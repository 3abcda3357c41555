"""The Redis / Valkey backend: one truth across replicas, changed only by the Lua scripts
in lua/ (docs/redis.md; docs/design.md, "The Redis backend", one reason to change per
module):

- scripts.py  the scripts as loaded (lua/common.lua and the parts each needs) and the
              encoding of the commands that call them
- keys.py     every key the backend writes
- link.py     the connection (pipelined; redis-py on a cluster), its set-up, the heartbeat,
              and the one seam where a failure becomes a BackendError
              (clock.py: Redis's clock; marker.py: the store marker)
- batcher.py  one script call per event-loop tick, for decisions and settlements alike
- cluster.py  provider quotas on Redis Cluster, in two steps
- lease.py    capacity leases for hot tenants
- spend.py    the ledger's day index and ranged spend read
- backend.py  RedisBackend: composes them behind the Backend interface
"""
from sidecar.backends.redis.backend import RedisBackend
from sidecar.backends.redis.batcher import BATCH_MAX
from sidecar.backends.redis.scripts import Script, load_script, pack

__all__ = ["BATCH_MAX", "RedisBackend", "Script", "load_script", "pack"]
