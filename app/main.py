"""The ASGI app: `uvicorn app.main:app` (after `alembic upgrade head`)."""

from __future__ import annotations

import gc
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.routing import APIRoute
from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from app.auth import TokenVerifier
from app.balance.router import router as balance_router
from app.checkout.router import create_checkout_session
from app.checkout.router import router as checkout_router
from app.config import Settings, get_settings
from app.db import Reader, create_engine, create_session_factory
from app.disputes.router import router as disputes_router
from app.errors import install_error_handlers, problem_response
from app.fast_reads import FastReads, fast_reads_for
from app.fast_writes import FastPost
from app.health.router import migration_head, older_migrations
from app.health.router import router as health_router
from app.idempotency import prune_expired_keys
from app.maintenance.router import router as maintenance_router
from app.maintenance.service import retry_pending_extensions
from app.notifications.worker import EmailWorker
from app.observability import RequestContextMiddleware, configure_logging
from app.openapi import BillingAPI
from app.plans.router import router as plans_router
from app.portal.router import router as portal_router
from app.rate_limit import StripeReadThrottle
from app.refunds.router import refund_eligibility
from app.refunds.router import router as refunds_router
from app.stripe_gateway import StripeGateway
from app.subscriptions.router import get_channel_access
from app.subscriptions.router import router as subscriptions_router
from app.subscriptions.service import record_expired_access
from app.webhooks.ingest import EventIngestor
from app.webhooks.processor import EventProcessor, prune_payloads
from app.webhooks.router import WEBHOOK_PATH, WebhookFastPath
from app.webhooks.router import router as webhooks_router
from app.webhooks.wakeup import StoredEventsNotifier
from app.workers import BackgroundWorkers


class ProblemCORSMiddleware(CORSMiddleware):
    """Starlette's CORS, with a refused preflight (an origin, method or header not allowed)
    answered like every other error: 400 `application/problem+json`, code `cors_not_allowed`,
    instead of Starlette's plain text. The CORS headers it sets stay as Starlette sets them."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        headers = {
            name: value
            for name, value in response.headers.items()
            if name not in ("content-length", "content-type")
        }
        return problem_response(
            400,
            "cors_not_allowed",
            "CORS request not allowed",
            bytes(response.body).decode(),  # "Disallowed CORS origin, headers"
            headers=headers,
        )


class BillingApp(BillingAPI):
    """The FastAPI app, with Stripe's deliveries (`POST /webhooks/stripe`) answered by
    `WebhookFastPath` before any of FastAPI's own layers (its error and telemetry middlewares,
    routing, dependencies): they cost more than the acknowledgement itself. Everything else,
    lifespan included, is FastAPI's."""

    webhook: WebhookFastPath | None = None
    fast_reads: FastReads | None = None
    """The read routes' successful answers (app/fast_reads.py); FastAPI answers the rest."""
    fast_checkout: FastPost | None = None
    """Checkout creation once its input is valid (app/fast_writes.py); FastAPI answers the rest."""
    _telemetry_checked: tuple[float, bool] = (0.0, False)
    """(until when, on): `_telemetry_on`'s last answer."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if scope["path"] == WEBHOOK_PATH and scope["method"] == "POST" and self.webhook:
                await self.webhook(scope, receive, send)
                return
            if not self.root_path and not self._telemetry_on():
                if self.fast_reads is not None:
                    found = self.fast_reads.match(scope)
                    if found is not None and await self.fast_reads(scope, receive, send, found):
                        return
                if self.fast_checkout is not None:
                    raw_params = self.fast_checkout.match(scope)
                    if raw_params is not None:
                        unanswered = await self.fast_checkout(scope, receive, send, raw_params)
                        if unanswered is None:
                            return
                        receive = unanswered
        await super().__call__(scope, receive, send)

    def _telemetry_on(self) -> bool:
        """FastAPI's own OpenTelemetry instrumentation: when it is on, FastAPI answers. Its
        check reads the environment and the providers (~4% of an access check's CPU), so its
        answer is kept for a second: instrumentation configured later takes over within it."""
        until, on = self._telemetry_checked
        now = time.monotonic()
        if now >= until:
            telemetry = getattr(self, "_native_telemetry", None)
            on = telemetry is not None and bool(telemetry.enabled())
            self._telemetry_checked = (now + 1.0, on)
        return on


def create_app(settings: Settings | None = None, gateway: StripeGateway | None = None) -> FastAPI:
    """Build the app; tests pass their own settings and gateway."""
    settings = settings or get_settings()
    configure_logging(settings.log_level)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(settings.database_url, settings.database_pool_size)
        app.state.engine = engine
        app.state.session_factory = create_session_factory(engine)
        app.state.reader = Reader(engine)
        own_gateway = gateway is None
        app.state.stripe = gateway or StripeGateway.from_settings(settings)
        processor = EventProcessor(app.state.session_factory, settings, app.state.stripe)
        # at most a quarter of the pool's connections (pool + overflow) for the flushers
        ingestor = EventIngestor(engine, flushers=max(1, min(4, settings.database_pool_size // 2)))
        ingestor.on_stored.append(processor.notify)
        notifier = None
        if not settings.run_background_workers:  # a `billing process-events` applies them
            notifier = StoredEventsNotifier(engine)
            ingestor.on_stored.append(notifier.poke)
        app.state.event_processor = processor
        app.state.event_ingestor = ingestor
        workers = BackgroundWorkers()
        if settings.run_background_workers:
            workers.start("stripe-events", processor.run_forever())
            workers.every(
                "expire-access",
                60,
                lambda: record_expired_access(app.state.session_factory, settings),
            )
            workers.every(
                "maintenance-pushes",
                60,
                lambda: retry_pending_extensions(app.state.session_factory, app.state.stripe),
            )
            workers.every(
                "prune-events",
                3600,
                lambda: prune_payloads(app.state.session_factory, settings.event_retention_days),
            )
            workers.every(
                "prune-idempotency-keys",
                3600,
                lambda: prune_expired_keys(app.state.session_factory),
            )
        email_worker = EmailWorker(app.state.session_factory, settings)
        if settings.run_background_workers:
            email_worker.start()
        # Everything built so far lives as long as the app: keep it out of the garbage
        # collector's full passes (each took ~0.2 s with the app's ~150k objects, a latency
        # spike every few hundred webhook deliveries; bench/README.md). Undone at shutdown.
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()
            await email_worker.stop()
            await workers.stop()
            await ingestor.stop()
            if notifier is not None:
                await notifier.stop()
            if own_gateway:
                await app.state.stripe.close()
            app.state.reader.close()
            await engine.dispose()

    app = BillingApp(
        title="1msg billing service",
        version="0.1.0",
        description=(
            "Stripe Checkout and Customer Portal for 1msg channel plans, the prepaid balance, "
            "refund and appeal requests, maintenance extensions, and the Stripe webhook consumer."
        ),
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.token_verifier = TokenVerifier(settings)
    app.state.stripe_reads = StripeReadThrottle()
    app.state.webhook_secrets = [
        secret.get_secret_value().encode() for secret in settings.stripe_webhook_secrets
    ]
    app.state.migration_head = migration_head()
    app.state.older_migrations = older_migrations()
    install_error_handlers(app)
    app.add_middleware(
        ProblemCORSMiddleware,
        allow_origins=settings.cors_allowed_origins,
        allow_methods=["GET", "POST", "PATCH"],
        allow_headers=["Authorization", "Content-Type", "Idempotency-Key"],
        # headers of our answers the browser frontend reads (none is CORS-safelisted)
        expose_headers=["Retry-After", "Idempotent-Replayed", "X-Request-ID"],
        max_age=600,
    )
    app.include_router(health_router)
    app.include_router(plans_router)
    app.include_router(checkout_router)
    app.include_router(portal_router)
    app.include_router(subscriptions_router)
    app.include_router(balance_router)
    app.include_router(refunds_router)
    app.include_router(disputes_router)
    app.include_router(webhooks_router)
    app.include_router(maintenance_router)
    app.add_middleware(RequestContextMiddleware)
    app.webhook = WebhookFastPath(
        app,
        next(
            r for r in webhooks_router.routes if isinstance(r, APIRoute) and r.path == WEBHOOK_PATH
        ),
    )
    app.fast_reads = fast_reads_for(
        app, [subscriptions_router, refunds_router], [get_channel_access, refund_eligibility]
    )
    app.fast_checkout = FastPost(
        app,
        next(
            r
            for r in checkout_router.routes
            if isinstance(r, APIRoute) and r.endpoint is create_checkout_session
        ),
    )
    return app


app = create_app()
