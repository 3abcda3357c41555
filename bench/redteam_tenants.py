"""Red-team probe: invented tenant ids under `unknown: defaults`, each one request
through a real Envoy (embedded backend: the stack of bench/attacks.py).

  PYTHONPATH=. python bench/redteam_tenants.py [N]     (20,000: about a minute here)

Each id is 100+ characters (the tenant rule allows 128). Printed: answers by status, the
sidecar's RSS before and after, GET /v1/spend's size, time and tenant count.
"""
import asyncio
import json
import sys
import time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.attacks import target, POLICY, request

N = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
CONNS = 16
def req(tenant):
    body = json.dumps({"model":"gpt-4o","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}).encode()
    return (f"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nx-tenant-id: {tenant}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n").encode()+body
async def conn(port, ids, counts):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    for t in ids:
        w.write(req(t))
        head = await r.readuntil(b"\r\n\r\n")
        st = int(head.split(b" ")[1]); counts[st] = counts.get(st,0)+1
        hs = {l.split(b":")[0].strip().lower(): l.split(b":",1)[1].strip() for l in head.split(b"\r\n")[1:] if b":" in l}
        if b"content-length" in hs: await r.readexactly(int(hs[b"content-length"]))
    w.close()
def rss(pid):
    for l in Path(f"/proc/{pid}/status").read_text().splitlines():
        if l.startswith("VmRSS"): return int(l.split()[1])//1024
with target(POLICY) as t:
    r0 = rss(t.pid); counts = {}
    t0 = time.time()
    async def main():
        ids = [f"inv-{i}-{'x'*100}" for i in range(N)]
        await asyncio.gather(*(conn(t.envoy.listen_port, ids[i::CONNS], counts) for i in range(CONNS)))
    asyncio.run(main())
    el = time.time()-t0
    time.sleep(2)
    t1 = time.time()
    st, _, body = request(t.books_port, "GET", "/v1/spend", headers=t.books_headers(), timeout=60)
    t2 = time.time()
    print({"tenants": N, "counts": counts, "send_s": round(el,1), "rss_mb_before": r0, "rss_mb_after": rss(t.pid),
           "spend_status": st, "spend_bytes": len(body), "spend_s": round(t2-t1,2), "spend_tenants": len(json.loads(body)["tenants"]) if st==200 else None})
