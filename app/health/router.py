"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import os
from pathlib import Path

from alembic.config import Config
from alembic.script import ScriptDirectory
from fastapi import APIRouter, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    generate_latest,
    multiprocess,
)
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.errors import Problem, ServiceUnavailable, error_responses
from app.refunds.metrics import refresh_refund_metrics

router = APIRouter(tags=["health"])

PROJECT_ROOT = Path(__file__).resolve().parents[2]


class Health(BaseModel):
    status: str


def _scripts() -> ScriptDirectory:
    config = Config(str(PROJECT_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(PROJECT_ROOT / "migrations"))
    return ScriptDirectory.from_config(config)


def migration_head() -> str | None:
    return _scripts().get_current_head()


def older_migrations() -> frozenset[str]:
    """The revisions before this code's head: a database at one of them is not ready."""
    scripts = _scripts()
    head = scripts.get_current_head()
    return frozenset(s.revision for s in scripts.walk_revisions() if s.revision != head)


@router.get("/healthz", summary="The process is alive", response_model=Health)
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    summary="The database is reachable and migrated to head",
    response_model=Health,
    responses=error_responses(ServiceUnavailable),
)
async def readyz(request: Request) -> Health:
    # Ready at the code's head, or at a revision this code does not know: the next release's
    # migrations, run before its rollout (README "Migrations") while this one still serves;
    # not ready behind the head (or never migrated).
    engine: AsyncEngine = request.app.state.engine
    expected: str | None = request.app.state.migration_head
    older: frozenset[str] = request.app.state.older_migrations
    try:
        async with engine.connect() as connection:
            current = (
                await connection.execute(text("SELECT version_num FROM alembic_version"))
            ).scalar_one_or_none()
    except Exception as exc:
        raise ServiceUnavailable(
            f"database unreachable or not migrated ({type(exc).__name__})"
        ) from None
    if current != expected and (current is None or current in older):
        raise ServiceUnavailable(f"database at migration {current}, expected {expected}")
    return Health(status="ready")


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
)
async def metrics(request: Request) -> Response:
    await refresh_refund_metrics(request.app.state.session_factory)
    return Response(generate_latest(_registry()), media_type=CONTENT_TYPE_LATEST)


def _registry() -> CollectorRegistry:
    """This process's metrics; with `PROMETHEUS_MULTIPROC_DIR` (several uvicorn workers in one
    container, `WEB_CONCURRENCY`), those of every worker, summed: a scrape reaches one worker
    at random, and its own counts alone would jump from scrape to scrape."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


__all__ = ["Problem", "router"]
