"""Parameters shared by the routes: the account-scoped routes' path parameters, the
`Idempotency-Key` header, and the list filters."""

from __future__ import annotations

from typing import Annotated

from fastapi import Header, Path
from pydantic import BeforeValidator, StringConstraints

AccountId = Annotated[
    str,
    Path(
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_-]+$",
        description="1msg account id (letters, digits, `_` and `-`: it is Stripe's "
        "`client_reference_id`).",
    ),
]
ChannelId = Annotated[
    str,
    Path(min_length=1, max_length=64, pattern=r"^[\x21-\x7e]+$", description="1msg channel id."),
]
IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        description="Replays the first response for 24 hours when the same key and body are "
        "sent again (scoped to the token's `sub`, the account, the method and the path).",
    ),
]


def _blank_is_none(value: object) -> object:
    return None if value == "" else value


BlankIsNone = BeforeValidator(_blank_is_none)
"""A list filter given empty (`?status=`, what a form sends for "any") filters nothing: it is
neither a value to refuse nor one to match (no row has an empty status or account)."""

AccountFilter = Annotated[
    Annotated[str, StringConstraints(max_length=64)] | None,
    BlankIsNone,
]
