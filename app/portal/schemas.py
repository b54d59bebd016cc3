"""Customer Portal sessions: the HTTP contract."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from app.redirects import RedirectUrl


class PortalSessionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    return_url: RedirectUrl


class PortalSessionOut(BaseModel):
    id: str = Field(description="Our portal session id.")
    url: str = Field(description="The Stripe Customer Portal page to send the browser to.")
    return_url: str
