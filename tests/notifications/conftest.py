"""Fixtures for email delivery: a local SMTP server and settings pointing at it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from app.config import Settings
from tests.notifications.smtp import SmtpServer


@pytest.fixture(scope="session")
def smtp_session_server() -> Iterator[SmtpServer]:
    server = SmtpServer().start()
    yield server
    server.stop()


@pytest.fixture
def smtp_server(smtp_session_server: SmtpServer) -> Iterator[SmtpServer]:
    """The local SMTP server, empty and up at the start of each test."""
    smtp_session_server.clear()
    smtp_session_server.start()
    yield smtp_session_server
    smtp_session_server.start()


@pytest.fixture
def smtp_settings(settings: Settings, smtp_server: SmtpServer) -> Settings:
    """The test settings with SMTP pointed at the local server and a short SMTP timeout."""
    return settings.model_copy(
        update={
            "smtp_host": smtp_server.host,
            "smtp_port": smtp_server.port,
            "smtp_timeout_seconds": 5.0,
            "email_from": "1msg billing <billing@1msg.io>",
        }
    )
