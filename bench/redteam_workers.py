"""Red-team probe: `kt serve --workers 2` on one Valkey, one worker SIGKILLed while 6
admitted streams are held at the upstream; the streams then end.

  K=0|1 PYTHONPATH=. python bench/redteam_workers.py [MAX_TOKENS]   (0: none in the body)

K picks which worker is killed (the streams share one HTTP/2 connection, so one worker
decided them all). Printed: statuses, the bill, the budget used (a probe the upstream
fails, refunded; its own estimate, 42,000, is in the figure), GET /v1/spend.
"""
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.redteam_shutdown import POLICY, budget_used, post
from bench.redteam_ledger import family
from sidecar.envoy_config import EnvoyOptions, TierRoute, render
from tests.support.procs import EnvoyProcess, SidecarProcess, free_port, wait_until, workdir
from tests.support.upstream import FakeUpstream
from tests.support.valkey import Valkey
MAXT = int(sys.argv[1]) if len(sys.argv) > 1 else 4000
USAGE = (1000, 3000)
with workdir("kt-rt-workers-") as d, FakeUpstream("llm") as up, Valkey(d) as v:
    (d / "policy.yaml").write_text(POLICY + f'backend: {{kind: redis, url: "{v.url}"}}\n')
    with SidecarProcess(d / "policy.yaml", d, ("--workers", "2")) as sc:
        eadmin, listen = free_port(), free_port()
        opts = EnvoyOptions(listen_port=listen, admin_port=eadmin, sidecar_address=f"127.0.0.1:{sc.grpc_port}",
                            tiers=[TierRoute("default", "gpt-4o", up.address)])
        with EnvoyProcess(render(opts), d, eadmin, listen):
            up.release_stream.clear()
            body = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "A long story."}]}
            if MAXT: body["max_tokens"] = MAXT
            res = []
            ths = [threading.Thread(target=lambda: res.append(post(listen, body, {"x-fake-usage": "%d,%d" % USAGE}))) for _ in range(6)]
            for t in ths: t.start()
            wait_until(lambda: len(up.requests) == 6, 15, "admitted")
            kids = [p for p in family(sc.proc.pid) if p != sc.proc.pid]
            print("workers", kids)
            os.kill(kids[int(os.environ.get("K", "0"))], signal.SIGKILL)
            time.sleep(0.5)
            up.release_stream.set()
            for t in ths: t.join(30)
            time.sleep(4)
            used = budget_used(listen); time.sleep(1.5)
            cells = sc.spend().get("streamer", {})
            spend = sum(c.get("cost_nano_usd", 0) for c in cells.values())
            served = sum(1 for r in res if r[0] == 200)
            print(json.dumps({"statuses": [r[0] for r in res], "bill": served * (USAGE[0]*2500 + USAGE[1]*10000), "budget_used": used, "spend": spend}))
