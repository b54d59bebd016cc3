"""A minimal HTTP/1.1 client for timing one request at a time: one keep-alive connection,
requests written as bytes, responses read by `Content-Length`.

Why not httpx: its per-request work on the client side (~2 ms for `GET /healthz` on this box,
against ~0.35 ms through wrk) is the load generator's time, not the service's, and would be
counted in a latency measured one request at a time. This client spends ~0.1 ms of its own.
It only understands what the service sends: a status line, headers, and a `Content-Length`
or chunked body.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any


class LeanClient:
    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._last_used = 0.0

    async def __aenter__(self) -> LeanClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._writer is not None:
            self._writer.close()

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The keep-alive connection, opened again (untimed) after a second of silence: the
        server closes idle ones (uvicorn after 5 s)."""
        if self._writer is None or time.monotonic() - self._last_used > 1.0:
            if self._writer is not None:
                self._writer.close()
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        assert self._reader is not None
        return self._reader, self._writer

    async def request(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        json_body: Any = None,
    ) -> tuple[int, bytes, float]:
        """(status, body, milliseconds from the first byte written to the last byte read)."""
        reader, writer = await self._connection()
        body = json.dumps(json_body).encode() if json_body is not None else b""
        lines = [f"{method} {path} HTTP/1.1", f"host: {self.host}:{self.port}"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        if json_body is not None:
            lines += ["content-type: application/json", f"content-length: {len(body)}"]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        started = time.perf_counter()
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        fields = {}
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            fields[name.strip().lower()] = value.strip()
        if fields.get(b"transfer-encoding") == b"chunked":
            content = await self._chunks(reader)
        else:
            content = await reader.readexactly(int(fields.get(b"content-length", 0)))
        elapsed = (time.perf_counter() - started) * 1000
        self._last_used = time.monotonic()
        return int(head.split(b" ", 2)[1]), content, elapsed

    @staticmethod
    async def _chunks(reader: asyncio.StreamReader) -> bytes:
        content = b""
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            content += (await reader.readexactly(size + 2))[:-2]
        await reader.readuntil(b"\r\n")  # the empty trailer
        return content
