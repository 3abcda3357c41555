"""A TLS front for the test Valkey (the packaged Valkey is built without TLS): Python's
ssl terminates TLS, bytes go on to the real Valkey. Certificates come from trustme, a
private CA made per test run."""
from __future__ import annotations

import asyncio
import ssl
import threading
from typing import Optional

from tests.support.procs import LOOPBACK


class TlsProxy:
    """``with TlsProxy(valkey_port, server_context) as proxy:`` serves on ``proxy.port``."""

    def __init__(self, target_port: int, server_context: ssl.SSLContext) -> None:
        self.target_port = target_port
        self.context = server_context
        self.port = 0
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._server: Optional[asyncio.AbstractServer] = None

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(LOOPBACK, self.target_port)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._client, LOOPBACK, 0, ssl=self.context)
        self.port = self._server.sockets[0].getsockname()[1]

    def __enter__(self) -> "TlsProxy":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def __exit__(self, *exc) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
