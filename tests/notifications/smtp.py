"""A real SMTP server for tests: aiosmtpd on 127.0.0.1 with a random port, recording every
message it accepted. Shareable: `from tests.notifications.smtp import SmtpServer`, and the
`smtp_server` / `smtp_settings` fixtures in tests/notifications/conftest.py.

    server = SmtpServer().start()
    ... point SMTP_HOST/SMTP_PORT at server.host/server.port ...
    server.messages        # [ReceivedEmail(mail_from, rcpt_tos, message)] in arrival order
    server.stop(); server.start()   # the relay goes down and comes back on the same port
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import socket
import threading
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller


@dataclass(frozen=True)
class ReceivedEmail:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage

    @property
    def body(self) -> str:
        part = self.message.get_body(preferencelist=("plain",))
        return part.get_content() if part is not None else ""


class _Recorder:
    def __init__(self, server: SmtpServer) -> None:
        self.server = server

    async def handle_DATA(self, _server: Any, _session: Any, envelope: Any) -> str:
        if self.server.reply_to_data is not None:
            return self.server.reply_to_data
        if self.server.data_delay:
            await asyncio.sleep(self.server.data_delay)
        parsed = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        with self.server.lock:
            self.server.messages.append(
                ReceivedEmail(envelope.mail_from, list(envelope.rcpt_tos), parsed)
            )
        return "250 OK"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class SmtpServer:
    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or _free_port()
        self.messages: list[ReceivedEmail] = []
        self.lock = threading.Lock()
        self.reply_to_data: str | None = None  # e.g. "451 try later" to refuse DATA
        self.data_delay = 0.0  # seconds a slow relay takes to answer DATA
        self._controller: Controller | None = None

    def start(self) -> SmtpServer:
        if self._controller is None:
            self._controller = Controller(_Recorder(self), hostname=self.host, port=self.port)
            self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    @property
    def running(self) -> bool:
        return self._controller is not None

    def to(self, address: str) -> list[ReceivedEmail]:
        with self.lock:
            return [m for m in self.messages if address in m.rcpt_tos]

    def clear(self) -> None:
        with self.lock:
            self.messages.clear()
        self.reply_to_data = None
        self.data_delay = 0.0
