"""Webhook acknowledgements and the ops view of stored events."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field


class WebhookAck(BaseModel):
    received: bool = Field(description="The event is durably stored.")
    duplicate: bool = Field(description="The event had been received before; nothing new.")


class StoredEvent(BaseModel):
    id: str = Field(description="Stripe event id.")
    type: str
    status: str = Field(description="pending, processed, failed or ignored.")
    attempts: int
    last_error: str | None
    stripe_created: datetime
    received_at: datetime
    processed_at: datetime | None
    next_attempt_at: datetime | None


class StoredEventList(BaseModel):
    data: list[StoredEvent]
    next_cursor: str | None = Field(description="Pass as `after` for the next page.")
