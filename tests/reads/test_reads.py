"""The read-only routes (channel access, refund eligibility): answered from one autocommit
statement each, with the same answers as the rules in app/subscriptions/access.py and
app/refunds/eligibility.py; a pooled connection the database dropped is replaced without the
caller noticing; a database that is down is a 503, not a 500."""

from __future__ import annotations

import asyncio
import socket
import time
import types
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import jwt
import pytest
from fastapi import FastAPI
from sqlalchemy import Integer, Row, bindparam, cast, func, select, update
from sqlalchemy.exc import DBAPIError

import app.auth
from app.auth import TokenVerifier, mint_token
from app.config import Settings
from app.db import MAX_KEYS_PER_READ, Reader, asked_keys
from app.errors import Unauthorized
from app.main import create_app
from app.models import (
    Account,
    Channel,
    Invoice,
    LedgerEntry,
    Refund,
    RefundExecution,
    RefundRequest,
    Subscription,
)
from app.refunds.repository import ELIGIBILITY_FACTS
from app.subscriptions.service import CHANNEL_ACCESS
from tests.conftest import TokenFactory, bearer, make_settings, plain_dsn
from tests.reads.rows import NOW, succeeded_payment
from tests.stripe_fake import StripeFake


def subscription(stripe_id: str, channel_id: str, status: str, **values: Any) -> Subscription:
    return Subscription(
        stripe_id=stripe_id,
        account_id="acc_a",
        channel_id=channel_id,
        status=status,
        current_period_end=values.pop("current_period_end", NOW + timedelta(days=20)),
        **values,
    )


async def test_channel_access_is_the_best_of_the_channels_subscriptions(
    app: FastAPI, client: httpx.AsyncClient, token: TokenFactory
) -> None:
    period_end = NOW + timedelta(days=20)
    async with app.state.session_factory() as session, session.begin():
        session.add(Account(id="acc_a", currency="usd"))
        session.add_all(
            [Channel(id="ch_a", account_id="acc_a"), Channel(id="ch_r", account_id="acc_a")]
        )
        await session.flush()
        session.add_all(
            [
                subscription(
                    "sub_old", "ch_a", "canceled", current_period_end=NOW - timedelta(days=5)
                ),
                subscription(
                    "sub_new",
                    "ch_a",
                    "active",
                    current_period_end=period_end,
                    extension_days=3,
                    extension_days_in_period=1,
                ),
                subscription(
                    "sub_rev", "ch_r", "active", access_revoked_at=NOW - timedelta(hours=1)
                ),
            ]
        )
    headers = bearer(token(scope="billing:read"))

    best = (await client.get("/v1/channels/ch_a/access", headers=headers)).json()
    assert best["has_access"] is True
    assert best["reason"] == "subscription_active"
    assert datetime.fromisoformat(best["access_until"]) == period_end + timedelta(days=2)

    revoked = (await client.get("/v1/channels/ch_r/access", headers=headers)).json()
    assert (revoked["has_access"], revoked["reason"]) == (False, "revoked")

    unknown = await client.get("/v1/channels/ch_none/access", headers=headers)
    assert unknown.status_code == 200
    assert unknown.json() == {
        "channel_id": "ch_none",
        "has_access": False,
        "access_until": None,
        "reason": "no_subscription",
    }


async def test_channel_access_without_access_does_not_change_when_postgres_reorders_the_rows(
    app: FastAPI, client: httpx.AsyncClient, token: TokenFactory
) -> None:
    """Two subscriptions that give no access: the answer is the most recently ended one,
    before and after an update that moves the other one's row (a new row version)."""
    revoked_at = NOW - timedelta(hours=1)
    async with app.state.session_factory() as session, session.begin():
        session.add(Account(id="acc_a", currency="usd"))
        session.add(Channel(id="ch_o", account_id="acc_a"))
        await session.flush()
        session.add(
            subscription("sub_o1", "ch_o", "canceled", current_period_end=NOW - timedelta(days=5))
        )
        await session.flush()
        session.add(subscription("sub_o2", "ch_o", "active", access_revoked_at=revoked_at))
    headers = bearer(token(scope="billing:read"))
    expected = {
        "channel_id": "ch_o",
        "has_access": False,
        "access_until": revoked_at.isoformat().replace("+00:00", "Z"),
        "reason": "revoked",
    }

    before = (await client.get("/v1/channels/ch_o/access", headers=headers)).json()
    async with app.state.session_factory() as session, session.begin():
        await session.execute(
            update(Subscription)
            .where(Subscription.stripe_id == "sub_o1")
            .values(cancel_at_period_end=True)
        )
    after = (await client.get("/v1/channels/ch_o/access", headers=headers)).json()

    assert before == after == expected


async def test_eligibility_counts_refunds_once_and_links_payments_through_their_invoice(
    app: FastAPI, client: httpx.AsyncClient, token: TokenFactory
) -> None:
    """A renewal paid through an invoice only (no subscription id on the payment) still pays
    for the subscription's current period and ends the first payment's; a mirrored refund and
    a refund we asked for that Stripe has not reported both count, once; a failed one does
    not."""
    async with app.state.session_factory() as session, session.begin():
        session.add(Account(id="acc_e", currency="usd"))
        session.add(Channel(id="ch_e", account_id="acc_e"))
        await session.flush()
        session.add(
            Subscription(
                stripe_id="sub_e",
                account_id="acc_e",
                channel_id="ch_e",
                status="active",
                current_period_end=NOW + timedelta(days=20),
            )
        )
        session.add(
            Invoice(
                stripe_id="in_2", account_id="acc_e", stripe_subscription_id="sub_e", currency="usd"
            )
        )
        first = succeeded_payment("pi_1", "acc_e", days_ago=40, stripe_subscription_id="sub_e")
        renewal = succeeded_payment("pi_2", "acc_e", days_ago=10, stripe_invoice_id="in_2")
        top_up = succeeded_payment(
            "pi_3", "acc_e", days_ago=1, purpose="top_up", amount=5000, fee=175
        )
        session.add_all([first, renewal, top_up])
        session.add_all(
            [
                Refund(
                    stripe_id="re_ok",
                    stripe_payment_intent_id="pi_2",
                    amount=500,
                    currency="usd",
                    status="succeeded",
                ),
                Refund(
                    stripe_id="re_failed",
                    stripe_payment_intent_id="pi_2",
                    amount=700,
                    currency="usd",
                    status="failed",
                ),
            ]
        )
        requests = [
            RefundRequest(
                account_id="acc_e",
                type="refund",
                status="refund_pending",
                description="refund",
                about_payment=True,
                channel="api",
                filed_by="tester",
                received_at=NOW,
            )
            for _ in range(2)
        ]
        session.add_all(requests)
        await session.flush()
        session.add_all(
            [
                RefundExecution(  # asked for, Stripe has not answered yet: counts
                    request_id=requests[0].id,
                    payment_id=renewal.id,
                    account_id="acc_e",
                    amount=300,
                    currency="usd",
                    status="pending",
                    requested_by="finance",
                ),
                RefundExecution(  # already mirrored as re_ok: not counted twice
                    request_id=requests[1].id,
                    payment_id=renewal.id,
                    account_id="acc_e",
                    amount=500,
                    currency="usd",
                    status="submitted",
                    stripe_refund_id="re_ok",
                    requested_by="finance",
                ),
            ]
        )
    url, headers = "/v1/accounts/acc_e/refund-eligibility", bearer(token(account_id="acc_e"))

    quotes = (await client.get(url, headers=headers)).json()["quotes"]
    assert [q["payment_id"] for q in quotes] == [str(renewal.id), str(first.id)]
    newest, oldest = quotes
    assert newest["already_refunded"] == 800
    assert newest["refundable_amount"] == 3900 - 800 - 1500 - 143
    assert (newest["eligible"], newest["reasons"]) == (True, [])
    assert oldest["already_refunded"] == 0
    assert oldest["reasons"] == ["period_ended"]

    async with app.state.session_factory() as session, session.begin():
        session.add(
            LedgerEntry(
                account_id="acc_e",
                kind="conversation",
                source_id="conv-1",
                amount=-25,
                currency="usd",
                description="conversation",
                occurred_at=NOW,
            )
        )
    quotes = (await client.get(url, headers=headers)).json()["quotes"]
    assert [q["reasons"][0] for q in quotes] == ["usage_detected", "usage_detected"]


async def test_a_read_survives_the_database_dropping_every_pooled_connection(
    app: FastAPI, client: httpx.AsyncClient, token: TokenFactory, database_url: str
) -> None:
    headers = bearer(token(scope="billing:read"))
    for _ in range(3):  # fill the pool
        assert (await client.get("/v1/channels/ch_x/access", headers=headers)).status_code == 200
    admin = await asyncpg.connect(plain_dsn(database_url))
    try:
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await admin.close()
    assert killed >= 1

    after = await client.get("/v1/channels/ch_x/access", headers=headers)
    assert after.status_code == 200, after.text
    assert after.json()["reason"] == "no_subscription"
    ready = await client.get("/readyz")
    assert ready.status_code == 200, ready.text


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
async def unreachable_app(stripe_fake: StripeFake) -> AsyncIterator[FastAPI]:
    url = f"postgresql+asyncpg://postgres@127.0.0.1:{closed_port()}/billing"
    application = create_app(make_settings(url, stripe_fake.url))
    async with application.router.lifespan_context(application):
        yield application


async def test_read_routes_answer_503_when_the_database_is_unreachable(
    unreachable_app: FastAPI,
) -> None:
    settings = unreachable_app.state.settings
    service = bearer(mint_token(settings, sub="reader", scope="billing:read"))
    transport = httpx.ASGITransport(app=unreachable_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://billing.test") as client:
        for path in ("/v1/channels/ch_1/access", "/v1/accounts/acc_1/refund-eligibility"):
            response = await client.get(path, headers=service)
            assert response.status_code == 503, response.text
            assert response.headers["content-type"] == "application/problem+json"
            assert response.headers["retry-after"] == "5"
            assert response.json()["code"] == "service_unavailable"
        ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["code"] == "service_unavailable"


def test_a_verified_token_is_refused_once_it_expires(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    verifier = TokenVerifier(settings)
    token = mint_token(settings, sub="svc", scope="billing:read", ttl_seconds=60)
    assert verifier.verify(token).scopes == frozenset({"billing:read"})
    assert verifier.verify(token).sub == "svc"  # the cached verification

    later = datetime.now(UTC) + timedelta(seconds=61)

    class Later(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Later:  # type: ignore[override]
            return later  # type: ignore[return-value]

    monkeypatch.setattr(app.auth, "time", types.SimpleNamespace(time=later.timestamp))
    monkeypatch.setattr(jwt.api_jwt, "datetime", Later)
    with pytest.raises(Unauthorized, match="expired"):
        verifier.verify(token)


def test_a_token_verified_under_other_secrets_is_not_trusted(settings: Settings) -> None:
    token = mint_token(settings, sub="svc", scope="billing:read")
    assert TokenVerifier(settings).verify(token).sub == "svc"
    other = settings.model_copy(
        update={"auth_jwt_secret": type(settings.auth_jwt_secret)("x" * 40)}
    )
    with pytest.raises(Unauthorized):
        TokenVerifier(other).verify(token)


async def test_the_direct_asyncpg_path_returns_the_rows_sqlalchemy_core_does(
    app: FastAPI,
) -> None:
    """A statement's first execution goes through SQLAlchemy Core, later ones straight to
    asyncpg: same values, same types, same attribute names."""
    async with app.state.session_factory() as session, session.begin():
        session.add(Account(id="acc_a", currency="usd"))
        session.add(Channel(id="ch_d", account_id="acc_a"))
        await session.flush()
        session.add(subscription("sub_d", "ch_d", "active"))
        await session.flush()
        session.add(succeeded_payment("pi_d", "acc_a", days_ago=3, stripe_subscription_id="sub_d"))
    reader: Reader = app.state.reader
    for statement, params in (
        (CHANNEL_ACCESS, {"keys": ["ch_d"]}),
        (ELIGIBILITY_FACTS, {"keys": ["acc_a"]}),
    ):
        core = await reader.all(statement, params)
        direct = await reader.all(statement, params)
        assert all(isinstance(row, Row) for row in core)
        assert not any(isinstance(row, Row) for row in direct)  # the direct path answered
        assert len(core) == len(direct) == 1
        fields = core[0]._fields
        assert direct[0]._fields == fields
        for name in fields:
            if name != "now":  # the database's clock at each execution
                assert getattr(direct[0], name) == getattr(core[0], name), name
            assert type(getattr(direct[0], name)) is type(getattr(core[0], name)), name


async def test_a_statement_failing_on_the_direct_path_fails_as_through_sqlalchemy(
    app: FastAPI,
) -> None:
    """An error on the direct path is not asyncpg's: the statement runs again through Core,
    which raises its usual DBAPIError (what app/errors.py maps), and the reader still works."""
    reader: Reader = app.state.reader
    x, y = cast(bindparam("x"), Integer), cast(bindparam("y"), Integer)
    statement = select(func.mod(x, y, type_=Integer).label("rest"))
    assert [row.rest for row in await reader.all(statement, {"x": 7, "y": 4})] == [3]
    with pytest.raises(DBAPIError, match="division by zero"):
        await reader.all(statement, {"x": 7, "y": 0})  # on the direct path, then through Core
    assert [row.rest for row in await reader.all(statement, {"x": 8, "y": 5})] == [3]


async def test_reads_at_once_take_at_most_half_the_pool_and_keep_those_connections(
    app: FastAPI,
) -> None:
    """Reads at once wait for one of the reader's slots (half the pool), the direct path keeps
    the connections it used for the next reads instead of a checkout and checkin each, gives a
    kept one back to the pool once it was taken `KEEP_SECONDS` ago, and all of them at close."""
    reader: Reader = app.state.reader
    pool = app.state.engine.pool
    assert reader.slots == app.state.settings.database_pool_size // 2
    statement = select(
        func.pg_backend_pid(type_=Integer).label("pid"),
        func.pg_sleep(0.05, type_=Integer).label("slept"),
    )
    await reader.all(statement)  # through Core: the direct path is ready for the next ones
    assert pool.checkedout() == 0

    async def backend() -> int:
        rows = await reader.all(statement)
        assert not isinstance(rows[0], Row)  # the direct path answered
        pid: int = rows[0].pid
        return pid

    started = time.monotonic()
    pids = await asyncio.gather(*(backend() for _ in range(3 * reader.slots)))
    # at most `slots` backends at once, each answering three reads of 50 ms one after another
    assert len(set(pids)) <= reader.slots
    assert time.monotonic() - started >= 0.15
    kept = pool.checkedout()
    assert 1 <= kept <= reader.slots
    assert await backend() in pids  # a kept connection again, no new one
    assert pool.checkedout() == kept

    reader.KEEP_SECONDS = 0.0  # every kept connection is now due back to the pool
    await backend()
    assert pool.checkedout() == 1  # only the one it just used is kept

    reader.close()
    assert pool.checkedout() == 0
    await backend()  # the reader goes on working from the pool after a close


def keyed(expression: Any) -> Any:
    """A statement for `Reader.by_key`: each key of `keys` with `expression` of it as `value`."""
    asked = asked_keys("key")
    return select(asked.c.key, expression(asked.c.key).label("value"))


async def test_lookups_at_once_share_executions_and_each_caller_gets_its_own_rows(
    app: FastAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    reader: Reader = app.state.reader
    statement = keyed(lambda key: func.length(key, type_=Integer))
    executions: list[int] = []
    run = reader.all

    async def counted(statement: Any, params: dict[str, Any]) -> Any:
        executions.append(len(params["keys"]))
        return await run(statement, params)

    monkeypatch.setattr(reader, "all", counted)
    keys = [f"k{'x' * (n % 7)}{n}" for n in range(2 * MAX_KEYS_PER_READ + 10)]
    asked = [*keys, *keys[:5]]  # five keys asked twice at once

    answers = await asyncio.gather(*(reader.by_key(statement, key) for key in asked))

    assert [[tuple(row) for row in rows] for rows in answers] == [
        [(key, len(key))] for key in asked
    ]
    assert executions == [MAX_KEYS_PER_READ, MAX_KEYS_PER_READ, 10]  # each key once
    assert await reader.by_key(statement, "alone") == [("alone", 5)]  # a lone one runs at once
    assert executions[-1] == 1


async def test_an_execution_error_reaches_each_of_its_callers_and_the_next_keys_are_answered(
    app: FastAPI,
) -> None:
    reader: Reader = app.state.reader
    statement = keyed(lambda key: cast(10 / cast(key, Integer), Integer))
    failed = await asyncio.gather(
        *(reader.by_key(statement, key) for key in ("5", "0", "2")), return_exceptions=True
    )
    assert all(isinstance(error, DBAPIError) for error in failed), failed
    assert "division by zero" in str(failed[0])
    assert await asyncio.gather(*(reader.by_key(statement, k) for k in ("5", "2"))) == [
        [("5", 2)],
        [("2", 5)],
    ]


async def test_a_caller_cancelled_while_waiting_leaves_the_others_their_answers(
    app: FastAPI,
) -> None:
    reader: Reader = app.state.reader
    statement = keyed(lambda key: func.length(key, type_=Integer))
    first = asyncio.create_task(reader.by_key(statement, "first"))
    await asyncio.sleep(0)  # its execution starts before the next two are asked: they wait
    gone = asyncio.create_task(reader.by_key(statement, "gone"))
    stays = asyncio.create_task(reader.by_key(statement, "stays"))
    await asyncio.sleep(0)
    gone.cancel()
    assert await first == [("first", 5)]
    assert await stays == [("stays", 5)]
    assert gone.cancelled()


async def test_channel_access_checks_at_once_answer_what_each_alone_answers(
    app: FastAPI, client: httpx.AsyncClient, token: TokenFactory
) -> None:
    async with app.state.session_factory() as session, session.begin():
        session.add(Account(id="acc_a", currency="usd"))
        session.add_all([Channel(id=f"ch_{n}", account_id="acc_a") for n in range(4)])
        await session.flush()
        session.add_all(
            [
                subscription("sub_0", "ch_0", "active"),
                subscription("sub_1", "ch_1", "canceled", current_period_end=NOW),
                subscription("sub_2a", "ch_2", "past_due"),
                subscription("sub_2b", "ch_2", "active", extension_days=2),
                subscription("sub_3", "ch_3", "active", access_revoked_at=NOW),
            ]
        )
    headers = bearer(token(scope="billing:read"))
    paths = [f"/v1/channels/ch_{n}/access" for n in (0, 1, 2, 3, 4)]  # ch_4: none
    alone = [(await client.get(path, headers=headers)).json() for path in paths]
    assert [a["reason"] for a in alone] == [
        "subscription_active",
        "subscription_canceled",
        "subscription_active",
        "revoked",
        "no_subscription",
    ]

    at_once = await asyncio.gather(*(client.get(p, headers=headers) for p in paths * 8))

    assert [response.json() for response in at_once] == alone * 8


async def test_eligibility_quotes_at_once_answer_what_each_alone_answers(
    app: FastAPI, client: httpx.AsyncClient, token: TokenFactory
) -> None:
    async with app.state.session_factory() as session, session.begin():
        session.add_all([Account(id=f"acc_{n}", currency="usd") for n in range(4)])
        await session.flush()
        session.add_all(
            [
                succeeded_payment("pi_0a", "acc_0", days_ago=3),
                succeeded_payment("pi_0b", "acc_0", days_ago=40, amount=2900),
                succeeded_payment("pi_1", "acc_1", days_ago=2, fee=None),
                succeeded_payment("pi_2", "acc_2", days_ago=1, disputed=True),
                succeeded_payment("pi_3", "acc_3", days_ago=1, purpose="top_up"),
            ]
        )
    headers = bearer(token(scope="billing:read"))
    paths = [f"/v1/accounts/acc_{n}/refund-eligibility" for n in (0, 1, 2, 3, 4)]
    alone = [(await client.get(path, headers=headers)).json() for path in paths]
    assert [len(a["quotes"]) for a in alone] == [2, 1, 1, 0, 0]  # top-ups are not quoted here
    assert len({str(a) for a in alone[:3]}) == 3

    at_once = await asyncio.gather(*(client.get(p, headers=headers) for p in paths * 8))

    assert [response.json() for response in at_once] == alone * 8
