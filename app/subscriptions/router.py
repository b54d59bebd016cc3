"""Subscriptions, channel access and the access-change feed."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from app.accounts.params import AccountId, ChannelId
from app.auth import AccountReader, BillingReader
from app.db import BIGINT_MAX, SessionDep
from app.errors import Forbidden, ServiceUnavailable, Unauthorized, error_responses
from app.subscriptions import service
from app.subscriptions.schemas import (
    AccessChangeOut,
    AccessChangePage,
    AccessOut,
    SubscriptionList,
)

router = APIRouter(tags=["subscriptions"])


@router.get(
    "/v1/accounts/{account_id}/subscriptions",
    summary="The account's channel subscriptions and their access",
    response_model=SubscriptionList,
    responses=error_responses(Unauthorized, Forbidden),
)
async def list_subscriptions(
    account_id: AccountId, request: Request, session: SessionDep, _: AccountReader
) -> SubscriptionList:
    data = await service.list_subscriptions(session, request.app.state.settings, account_id)
    return SubscriptionList(data=data)


@router.get(
    "/v1/channels/{channel_id}/access",
    summary="Whether a channel may be served now",
    response_model=AccessOut,
    responses=error_responses(Unauthorized, Forbidden),
)
async def get_channel_access(
    channel_id: ChannelId, request: Request, _: BillingReader
) -> AccessOut:
    state = request.app.state  # the reader as an attribute, not one more dependency to solve
    return await service.get_channel_access(state.reader, state.settings, channel_id)


@router.get(
    "/v1/access-changes",
    summary="Every change of a channel's access, in order",
    response_model=AccessChangePage,
    responses=error_responses(Unauthorized, Forbidden, ServiceUnavailable),
)
async def list_access_changes(
    session: SessionDep,
    _: BillingReader,
    after: Annotated[
        int, Query(ge=0, le=BIGINT_MAX, description="Last id already seen (0: from the start).")
    ] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> AccessChangePage:
    rows = await service.list_access_changes(session, after=after, limit=limit)
    return AccessChangePage(
        data=[AccessChangeOut.model_validate(row, from_attributes=True) for row in rows],
        next_cursor=rows[-1].id if rows else after,
    )
