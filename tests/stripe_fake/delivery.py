"""Webhook delivery for the local Stripe simulator: every new event POSTed, signed like Stripe.

A background thread watches ``state.events`` and POSTs each new event to the configured
endpoint with a ``Stripe-Signature`` made exactly as Stripe makes it (a fresh timestamp per
attempt). A delivery that fails (connection refused, timeout, non-2xx) is retried with
exponential back-off (0.5 s doubling, at most ``max_backoff`` seconds) for as long as the
simulator runs, so events emitted while the service is down arrive once it is up.

Options that exercise the consumer the way Stripe's own delivery can:

- ``duplicate_rate`` (0..1): each event is delivered that often a second time.
- ``shuffle``: the events one action produced are delivered in random order (Stripe does
  not guarantee order; retries reorder deliveries anyway).
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field

import httpx

from .openapi import Json
from .server import event_payload, sign


@dataclass
class DeliveryRecord:
    """What happened to one event (shown on the controls page)."""

    event_id: str
    event_type: str
    attempts: int = 0
    deliveries: int = 0
    last_status: int | None = None
    last_error: str | None = None


@dataclass(order=True)
class _Pending:
    due: float
    seq: int
    event: Json = field(compare=False)
    attempts: int = field(default=0, compare=False)


class WebhookDelivery:
    """POSTs the simulator's events to one endpoint, signed with ``secret``."""

    def __init__(
        self,
        events_source: object,
        url: str,
        secret: str,
        *,
        duplicate_rate: float = 0.0,
        shuffle: bool = False,
        seed: int | None = None,
        max_backoff: float = 5.0,
        timeout: float = 10.0,
    ) -> None:
        self._source = events_source  # a StripeState: ._lock and .events
        self.url = url
        self.secret = secret
        self.duplicate_rate = duplicate_rate
        self.shuffle = shuffle
        self.max_backoff = max_backoff
        self._random = random.Random(seed)
        self._timeout = timeout
        self._cursor = 0
        self._seq = 0
        self._pending: list[_Pending] = []
        self.records: dict[str, DeliveryRecord] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> WebhookDelivery:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="stripe-webhooks", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=15)
            self._thread = None

    def wake(self) -> None:
        """New events exist (called by the simulator after every emit)."""
        self._wake.set()

    def redeliver(self, event: Json) -> None:
        """Deliver ``event`` once more (Stripe's dashboard "Resend")."""
        with self._lock:
            self._push(event, time.monotonic())
        self._wake.set()

    @property
    def backlog(self) -> int:
        """Deliveries not yet acknowledged (new events not yet picked up included)."""
        with self._lock:
            return len(self._pending) + len(self._source.events) - self._cursor  # type: ignore[attr-defined]

    def idle(self) -> bool:
        return self.backlog == 0

    # ------------------------------------------------------------------ loop

    def _push(self, event: Json, due: float) -> None:
        self._seq += 1
        self._pending.append(_Pending(due, self._seq, event))
        record = self.records.setdefault(event["id"], DeliveryRecord(event["id"], event["type"]))
        record.deliveries += 1

    def _collect(self) -> None:
        with self._source._lock:  # type: ignore[attr-defined]
            new = list(self._source.events[self._cursor :])  # type: ignore[attr-defined]
            self._cursor += len(new)
        if not new:
            return
        batch = list(new)
        if self.shuffle:
            self._random.shuffle(batch)
        now = time.monotonic()
        with self._lock:
            for event in batch:
                self._push(event, now)
            for event in batch:
                if self.duplicate_rate and self._random.random() < self.duplicate_rate:
                    self._push(event, now)

    def _next_due(self) -> _Pending | None:
        with self._lock:
            if not self._pending:
                return None
            item = min(self._pending)
            if item.due > time.monotonic():
                return None
            self._pending.remove(item)
            return item

    def _wait_seconds(self) -> float:
        with self._lock:
            if not self._pending:
                return 1.0
            return max(0.0, min(1.0, min(self._pending).due - time.monotonic()))

    def _run(self) -> None:
        with httpx.Client(timeout=self._timeout) as client:
            while not self._stop.is_set():
                self._collect()
                item = self._next_due()
                if item is None:
                    self._wake.wait(self._wait_seconds())
                    self._wake.clear()
                    continue
                self._send(client, item)

    def _send(self, client: httpx.Client, item: _Pending) -> None:
        body = event_payload(item.event)
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
            "Stripe-Signature": sign(body, self.secret),
        }
        record = self.records[item.event["id"]]
        record.attempts += 1
        item.attempts += 1
        try:
            response = client.post(self.url, content=body, headers=headers)
            record.last_status, record.last_error = response.status_code, None
            ok = 200 <= response.status_code < 300
        except Exception as exc:  # connection refused, timeout, bad URL: retry later
            record.last_status, record.last_error = None, type(exc).__name__
            ok = False
        if not ok:
            delay = min(self.max_backoff, 0.5 * 2 ** (item.attempts - 1))
            with self._lock:
                item.due = time.monotonic() + delay
                self._pending.append(item)
