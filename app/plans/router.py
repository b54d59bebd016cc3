"""The channel plan catalog (configuration: the PLANS setting)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from app.auth import PrincipalDep
from app.config import Settings
from app.errors import Unauthorized, error_responses

router = APIRouter(tags=["plans"])


class PlanOut(BaseModel):
    code: str = Field(description="Plan code to pass to checkout.")
    name: str
    stripe_price_id: str = Field(description="The Stripe recurring price behind the plan.")
    amount: int = Field(description="Price per interval in minor units.")
    currency: str
    interval: str


class PlanList(BaseModel):
    data: list[PlanOut]


@router.get(
    "/v1/plans",
    summary="Channel plans on sale",
    response_model=PlanList,
    responses=error_responses(Unauthorized),
)
async def list_plans(request: Request, _: PrincipalDep) -> PlanList:
    settings: Settings = request.app.state.settings
    return PlanList(data=[PlanOut(**plan.model_dump()) for plan in settings.plans])
