"""Redirect URLs (success, cancel, return) handed to Stripe: well-formed and allow-listed.

A URL is accepted when it is an absolute http(s) URL without credentials, whitespace or
backslashes, and it starts with one of `REDIRECT_ALLOWED_ORIGINS` at a boundary: the allowed
prefix is followed by nothing, `/`, `?` or `#` (or itself ends with `/`), so
`https://app.1msg.io.evil.example` and `https://app.1msg.io@evil.example` are refused.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field

from app.errors import RedirectNotAllowed

MAX_URL_LENGTH = 2048


def _well_formed(value: str) -> str:
    if any(ch.isspace() or ord(ch) < 32 or ch == "\\" for ch in value):
        raise ValueError("URL must not contain whitespace, control characters or backslashes")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError as exc:
        raise ValueError(f"malformed URL: {exc}") from None
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError("must be an absolute http(s) URL")
    if parts.username is not None or parts.password is not None:
        raise ValueError("URL must not carry credentials")
    return value


RedirectUrl = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_URL_LENGTH,
        description="Absolute http(s) URL on an allowed origin (`REDIRECT_ALLOWED_ORIGINS`).",
    ),
    AfterValidator(_well_formed),
]


def is_allowed(url: str, allowed: list[str]) -> bool:
    for prefix in allowed:
        if not url.startswith(prefix):
            continue
        rest = url[len(prefix) :]
        if prefix.endswith("/") or rest == "" or rest[0] in "/?#":
            return True
    return False


def check_redirects(allowed: list[str], **urls: str) -> None:
    """422 `redirect_not_allowed` naming the first URL outside the allow-list."""
    for name, url in urls.items():
        if not is_allowed(url, allowed):
            raise RedirectNotAllowed(f"`{name}` must start with one of the allowed origins")
