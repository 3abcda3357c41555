"""Do-nothing ext_authz servers: the references the sidecar is measured against.

  python bench/noop_authz.py grpc --ready-file F   # grpc.aio on uvloop, Check -> OK
  python bench/noop_authz.py http --ready-file F   # raw uvloop protocol, 200 to every request
  python bench/noop_authz.py als --ready-file F    # Envoy's access-log service, reads and drops

Each answers as cheaply as its transport allows and writes {"port": N} to the ready file.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os

import uvloop


async def grpc_main(ready: str) -> None:
    import grpc
    from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

    ok = external_auth_pb2.CheckResponse(status={"code": 0},
                                         ok_response=external_auth_pb2.OkHttpResponse())

    class Noop(external_auth_pb2_grpc.AuthorizationServicer):
        async def Check(self, request, context):  # noqa: N802
            return ok

    server = grpc.aio.server()
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(Noop(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    _ready(ready, port)
    await server.wait_for_termination()


async def als_main(ready: str) -> None:
    """Envoy's gRPC access-log service that reads every message and does nothing with it."""
    import grpc
    from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

    class Drain(als_pb2_grpc.AccessLogServiceServicer):
        async def StreamAccessLogs(self, request_iterator, context):  # noqa: N802
            async for _ in request_iterator:
                pass
            return als_pb2.StreamAccessLogsResponse()

    server = grpc.aio.server()
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(Drain(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    _ready(ready, port)
    await server.wait_for_termination()


class _NoopHttp(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.buf = b""

    def data_received(self, data):
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            length = 0
            for line in self.buf[:end].split(b"\r\n")[1:]:
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length:]
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")


async def http_main(ready: str) -> None:
    server = await asyncio.get_running_loop().create_server(_NoopHttp, "127.0.0.1", 0)
    _ready(ready, server.sockets[0].getsockname()[1])
    await server.serve_forever()


def _ready(path: str, port: int) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump({"port": port}, f)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["grpc", "http", "als"])
    ap.add_argument("--ready-file", required=True)
    a = ap.parse_args()
    uvloop.run({"grpc": grpc_main, "http": http_main, "als": als_main}[a.kind](a.ready_file))
