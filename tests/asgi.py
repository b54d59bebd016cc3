"""An HTTP request's ASGI scope as uvicorn passes it, for tests that call the app's fast
paths (app/fast_reads.py, app/fast_writes.py) directly."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote


def http_scope(method: str, path: str, headers: dict[str, str]) -> dict[str, Any]:
    """`path` may carry a query string; header names are lowercased, as servers pass them."""
    raw_path, _, query = path.partition("?")
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": unquote(raw_path),  # as servers pass it: percent-decoded
        "raw_path": raw_path.encode(),
        "root_path": "",
        "query_string": query.encode(),
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 1),
        "server": ("billing.test", 80),
        "state": {},
    }
