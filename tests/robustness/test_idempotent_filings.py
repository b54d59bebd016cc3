"""Creating POSTs beyond the contract's checkout honour `Idempotency-Key` too: a client's or
finance's request filing and an ops maintenance window. A retry after a lost answer must not
file a second request (a second clock, a second reply owed) or record a second window (whose
completion would email its clients again)."""

from __future__ import annotations

from typing import Any

import asyncpg
import httpx
import pytest

from tests.conftest import TokenFactory, bearer, plain_dsn
from tests.refunds.flows import outbox, set_email
from tests.refunds.test_refund_workflow import file_request, reply

WINDOW = {
    "starts_at": "2026-03-09T09:00:00+08:00",
    "ends_at": "2026-03-09T18:00:00+08:00",
    "kind": "scheduled",
    "reason": "DB upgrade",
}
FINANCE_FILING = {
    "account_id": "acc_mail",
    "type": "appeal",
    "description": "My channel was suspended",
    "channel": "email",
    "received_at": "2026-03-09T09:00:00+08:00",
}
CLIENT_FILING = {"type": "appeal", "description": "My access was suspended"}


async def listed(client: httpx.AsyncClient, path: str, headers: dict[str, str]) -> list[Any]:
    response = await client.get(path, headers=headers)
    assert response.status_code == 200, response.text
    body = response.json()
    return list(body["items"] if isinstance(body, dict) else body)


@pytest.mark.parametrize(
    ("path", "body", "caller", "listing"),
    [
        (
            "/v1/ops/maintenance-windows",
            WINDOW,
            {"scope": "ops", "sub": "ops-alice"},
            "/v1/ops/maintenance-windows",
        ),
        (
            "/v1/finance/refund-requests",
            FINANCE_FILING,
            {"scope": "finance", "sub": "bob@1msg.io"},
            "/v1/finance/refund-requests?account_id=acc_mail",
        ),
        (
            "/v1/accounts/acc_s/refund-requests",
            CLIENT_FILING,
            {"account_id": "acc_s", "email": "ops@client.example"},
            "/v1/accounts/acc_s/refund-requests",
        ),
    ],
    ids=["maintenance-window", "finance-filing", "client-filing"],
)
async def test_a_retried_filing_with_its_key_replays_the_first_and_creates_nothing_more(
    client: httpx.AsyncClient,
    token: TokenFactory,
    path: str,
    body: dict[str, Any],
    caller: dict[str, str],
    listing: str,
) -> None:
    headers = bearer(token(**caller))
    keyed = {**headers, "Idempotency-Key": "retry-1"}

    first = await client.post(path, json=body, headers=keyed)
    again = await client.post(path, json=body, headers=keyed)
    changed = {field: "other" for field in ("reason", "description") if field in body}
    other_body = await client.post(path, json={**body, **changed}, headers=keyed)

    assert first.status_code == 201, first.text
    assert (again.status_code, again.json()) == (201, first.json())
    assert again.headers["Idempotent-Replayed"] == "true"
    assert other_body.status_code == 409
    assert other_body.headers["content-type"] == "application/problem+json"
    assert other_body.json()["code"] == "idempotency_key_reused"
    assert [item["id"] for item in await listed(client, listing, headers)] == [first.json()["id"]]

    without_key = await client.post(path, json=body, headers=headers)
    assert without_key.status_code == 201  # no key: a second filing is a second filing
    assert len(await listed(client, listing, headers)) == 2


DROP_AT_COMMIT = """
CREATE SEQUENCE drop_connection_calls;
CREATE FUNCTION drop_connection_once() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF nextval('drop_connection_calls') = 1 THEN  -- not rolled back with the transaction
        PERFORM pg_terminate_backend(pg_backend_pid());
    END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER drop_connection_at_commit AFTER INSERT ON refund_requests
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION drop_connection_once();
"""
"""The next commit that files a request loses its connection (the database restarted, a
proxy dropped it): nothing of it commits. Once, so the retry commits normally."""


async def test_a_filing_whose_commit_fails_releases_its_key_so_the_retry_files_it(
    client: httpx.AsyncClient, token: TokenFactory, database_url: str
) -> None:
    headers = {**bearer(token(account_id="acc_c")), "Idempotency-Key": "commit-lost"}
    path = "/v1/accounts/acc_c/refund-requests"
    admin = await asyncpg.connect(plain_dsn(database_url))
    try:
        await admin.execute(DROP_AT_COMMIT)
        lost = await client.post(path, json=CLIENT_FILING, headers=headers)
        assert lost.status_code == 503, lost.text
        assert await admin.fetchval("SELECT count(*) FROM refund_requests") == 0

        retried = await client.post(path, json=CLIENT_FILING, headers=headers)
    finally:
        await admin.execute(
            "DROP FUNCTION IF EXISTS drop_connection_once() CASCADE;"
            " DROP SEQUENCE IF EXISTS drop_connection_calls"
        )
        await admin.close()

    # The 503 promised "retry": the key must not stay held by a request that is over (409
    # `idempotency_key_in_use` for minutes), and the retry files exactly one request.
    assert retried.status_code == 201, retried.text
    assert "Idempotent-Replayed" not in retried.headers
    assert len(await listed(client, path, bearer(token(account_id="acc_c")))) == 1


async def test_a_reply_sent_again_with_its_key_is_recorded_and_emailed_once(
    app: Any, client: httpx.AsyncClient, token: TokenFactory
) -> None:
    """A finance tool's reply whose answer was lost (or a double click) sent again with its
    Idempotency-Key replays the first answer: one reply shown to the client, one email. The
    same key with another reply is 409 `idempotency_key_reused`."""
    filed = await file_request(client, token, "acc_rp", type="appeal", description="Suspended")
    await set_email(app, "acc_rp", "client@acc_rp.example")
    initial = {"kind": "initial", "message": "We have your request and are looking into it."}

    first = await reply(client, token, filed["id"], idempotency_key="reply-1", **initial)
    again = await reply(client, token, filed["id"], idempotency_key="reply-1", **initial)
    other = await reply(
        client, token, filed["id"], idempotency_key="reply-1", kind="initial", message="Hi"
    )

    assert (first.status_code, again.status_code) == (201, 201), again.text
    assert again.json() == first.json()
    assert (other.status_code, other.json()["code"]) == (409, "idempotency_key_reused")
    shown = await client.get(
        f"/v1/accounts/acc_rp/refund-requests/{filed['id']}",
        headers=bearer(token(account_id="acc_rp")),
    )
    assert [r["kind"] for r in shown.json()["responses"]] == ["initial"]
    assert len(await outbox(app, "client@acc_rp.example")) == 1
