"""Bearer-token verification (HS256 JWTs) and the dependencies that guard routes.

A token carries exactly one of `account_id` (a user token from the 1msg frontend) or `scope`
(a service or staff token). Tokens are checked against `AUTH_JWT_SECRET` and, during rotation,
`AUTH_JWT_PREVIOUS_SECRET`. Where `AUTH_STAFF_JWT_SECRET` is set, a token carrying the staff
scopes `finance` or `ops` is accepted only when signed with that secret.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

import jwt
from fastapi import Depends, Request
from fastapi.security import HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param

from app.config import Settings
from app.errors import Forbidden, Unauthorized
from app.notifications.outbox import plausible_email

STAFF_SCOPES = frozenset({"finance", "ops"})
KNOWN_SCOPES = frozenset({"billing:read", "billing:write", "usage:write", "finance", "ops"})

BEARER_DESCRIPTION = "HS256 JWT (user or service token)"


@dataclass(frozen=True)
class Principal:
    """Who is calling: a client acting on one account, or a service/staff member with scopes."""

    sub: str
    account_id: str | None = None
    scopes: frozenset[str] = frozenset()
    email: str | None = None

    @property
    def is_user(self) -> bool:
        return self.account_id is not None

    def may_access_account(self, account_id: str, scope: str) -> bool:
        if self.account_id is not None:
            return self.account_id == account_id
        return scope in self.scopes


def decode_token(token: str, settings: Settings) -> Principal:
    """Verify a token and return its principal; raises Unauthorized for any bad token."""
    return _decode(token, settings)[0]


def _decode(token: str, settings: Settings) -> tuple[Principal, int]:
    """The token's principal and its `exp`."""
    staff_secret = settings.auth_staff_jwt_secret
    ordinary = [settings.auth_jwt_secret]
    if settings.auth_jwt_previous_secret is not None:
        ordinary.append(settings.auth_jwt_previous_secret)
    candidates = [(s, False) for s in ordinary]
    if staff_secret is not None:
        candidates.insert(0, (staff_secret, True))
    for secret, is_staff_secret in candidates:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                secret.get_secret_value(),
                algorithms=["HS256"],
                audience=settings.auth_jwt_audience,
                # `iat` only informs (RFC 7519 4.1.6): PyJWT would refuse one a moment ahead
                # of our clock, i.e. any token minted on a host whose clock runs ahead
                options={"require": ["sub", "exp", "aud"], "verify_iat": False},
            )
        except jwt.InvalidSignatureError:
            continue
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"Invalid token: {exc}") from None
        principal = _principal_from_claims(claims)
        if staff_secret is not None and not is_staff_secret and principal.scopes & STAFF_SCOPES:
            raise Unauthorized("Staff scopes require a token signed with the staff secret")
        return principal, int(claims["exp"])
    raise Unauthorized("Invalid token: signature verification failed")


MAX_TOKEN_LENGTH = 8192
"""Ours are a few hundred bytes; uvicorn passes a header on whatever its size, and a longer
token would be decoded and HMAC-checked once per configured secret."""


class TokenVerifier:
    """`decode_token` with a bounded cache of tokens already verified: a caller sends the same
    token with every request, and checking its HMAC and claims again costs more than the rest of
    a cheap read. A cached token is still refused once its `exp` has passed (checked on every
    use, as PyJWT does: expired once `int(exp) <= now`); only tokens that verified
    are cached, and the cache belongs to one `Settings` (one set of secrets)."""

    def __init__(self, settings: Settings, max_entries: int = 4096) -> None:
        self.settings = settings
        self.max_entries = max_entries
        self._verified: dict[str, tuple[Principal, int]] = {}

    def verify(self, token: str) -> Principal:
        if len(token) > MAX_TOKEN_LENGTH:  # before hashing, decoding or HMAC-checking it
            raise Unauthorized(f"Invalid token: too long (over {MAX_TOKEN_LENGTH} characters)")
        hit = self._verified.get(token)
        if hit is not None:
            principal, expires = hit
            if time.time() < expires:
                return principal
            del self._verified[token]
        principal, expires = _decode(token, self.settings)
        if len(self._verified) >= self.max_entries:
            self._verified.pop(next(iter(self._verified)))  # the oldest entry
        self._verified[token] = (principal, expires)
        return principal


def _principal_from_claims(claims: dict[str, Any]) -> Principal:
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise Unauthorized("Invalid token: `sub` must be a non-empty string")
    account_id = claims.get("account_id")
    scope = claims.get("scope")
    if (account_id is None) == (scope is None):
        raise Unauthorized("Invalid token: exactly one of `account_id` or `scope` is required")
    if account_id is not None:
        if not isinstance(account_id, str) or not account_id:
            raise Unauthorized("Invalid token: `account_id` must be a non-empty string")
        email = claims.get("email")
        return Principal(
            sub=sub, account_id=account_id, email=email if plausible_email(email) else None
        )
    if not isinstance(scope, str) or not scope.split():
        raise Unauthorized("Invalid token: `scope` must be a space-separated string")
    return Principal(sub=sub, scopes=frozenset(scope.split()))


def mint_token(
    settings: Settings,
    *,
    sub: str,
    account_id: str | None = None,
    scope: str | None = None,
    email: str | None = None,
    ttl_seconds: int = 3600,
) -> str:
    """Sign a token the way this service expects (staff scopes with the staff secret where set)."""
    claims: dict[str, Any] = {
        "sub": sub,
        "aud": settings.auth_jwt_audience,
        "exp": int(time.time()) + ttl_seconds,
        "iat": int(time.time()),
    }
    if account_id is not None:
        claims["account_id"] = account_id
    if scope is not None:
        claims["scope"] = scope
    if email is not None:
        claims["email"] = email
    secret = settings.auth_jwt_secret
    if scope and STAFF_SCOPES & set(scope.split()) and settings.auth_staff_jwt_secret is not None:
        secret = settings.auth_staff_jwt_secret
    return jwt.encode(claims, secret.get_secret_value(), algorithm="HS256")


class Guard(HTTPBearer):
    """A route guard: the bearer scheme of the OpenAPI document (`HTTPBearer`, as FastAPI's
    own `HTTPBearer` documents it) and the authorization rule in one dependency, so a request
    solves one dependency for its token instead of three (the scheme's, the verification's and
    the rule's). Subclasses say who may pass in `check`, which app/fast_reads.py also calls."""

    def __init__(self) -> None:
        super().__init__(auto_error=False, scheme_name="HTTPBearer", description=BEARER_DESCRIPTION)

    @staticmethod
    def verified(request: Request) -> Principal:
        """The token's principal, or Unauthorized (no `Bearer` credentials, or a bad token)."""
        authorization = request.headers.get("Authorization")
        scheme, credentials = get_authorization_scheme_param(authorization)
        if not (authorization and scheme and credentials) or scheme.lower() != "bearer":
            raise Unauthorized("Missing bearer token")
        verifier: TokenVerifier = request.app.state.token_verifier
        return verifier.verify(credentials)

    def check(self, request: Request, path_params: dict[str, str]) -> Principal:
        """The principal when it may pass (`path_params`: the raw path parameters), else
        Unauthorized or Forbidden."""
        return self.verified(request)


class _AnyToken(Guard):
    async def __call__(self, request: Request) -> Principal:  # type: ignore[override]
        return self.check(request, {})


class _Scope(Guard):
    """Service/staff tokens that carry `scope`."""

    def __init__(self, scope: str) -> None:
        super().__init__()
        self.scope = scope

    def check(self, request: Request, path_params: dict[str, str]) -> Principal:
        principal = self.verified(request)
        if self.scope not in principal.scopes:
            raise Forbidden(f"This route requires scope `{self.scope}`")
        return principal

    async def __call__(self, request: Request) -> Principal:  # type: ignore[override]
        return self.check(request, {})


class _AccountAccess(Guard):
    """For `/v1/accounts/{account_id}/...`: the account's own user token, or a service token
    carrying `scope`."""

    def __init__(self, scope: str) -> None:
        super().__init__()
        self.scope = scope

    def check(self, request: Request, path_params: dict[str, str]) -> Principal:
        principal = self.verified(request)
        if not principal.may_access_account(path_params["account_id"], self.scope):
            if principal.is_user:
                raise Forbidden("This token belongs to another account")
            raise Forbidden(f"This route requires scope `{self.scope}` or the account's own token")
        return principal

    async def __call__(self, account_id: str, request: Request) -> Principal:  # type: ignore[override]
        return self.check(request, {"account_id": account_id})


class _AccountOwner(Guard):
    """For account routes only the account's own user token may call (checked before the body
    is validated, like every other authorization dependency)."""

    def check(self, request: Request, path_params: dict[str, str]) -> Principal:
        principal = self.verified(request)
        if principal.account_id != path_params["account_id"]:
            raise Forbidden("Only the account's own token may do this")
        return principal

    async def __call__(self, account_id: str, request: Request) -> Principal:  # type: ignore[override]
        return self.check(request, {"account_id": account_id})


def check_route_guard(request: Request) -> None:
    """Run the guard of the request's route, if it has one (Unauthorized or Forbidden). FastAPI
    parses a JSON body before it solves any dependency, so a body that is not JSON would
    otherwise be answered 422 (or 400) to a caller with no token, or one that may not call the
    route at all; app/errors.py runs this before answering such a body."""
    dependant = getattr(request.scope.get("route"), "dependant", None)
    for dependency in getattr(dependant, "dependencies", ()):
        if isinstance(dependency.call, Guard):
            dependency.call.check(request, request.path_params)


def require_scope(scope: str) -> Callable[..., Awaitable[Principal]]:
    """A dependency admitting service/staff tokens that carry `scope`."""
    return _Scope(scope)


def account_access(scope: str) -> Callable[..., Awaitable[Principal]]:
    """A dependency for `/v1/accounts/{account_id}/...`: the account's own user token, or a
    service token carrying `scope`."""
    return _AccountAccess(scope)


get_principal = _AnyToken()
"""Any valid token's principal."""
account_owner = _AccountOwner()

PrincipalDep = Annotated[Principal, Depends(get_principal)]
AccountOwner = Annotated[Principal, Depends(account_owner)]
AccountReader = Annotated[Principal, Depends(account_access("billing:read"))]
AccountWriter = Annotated[Principal, Depends(account_access("billing:write"))]
UsageWriter = Annotated[Principal, Depends(require_scope("usage:write"))]
FinanceStaff = Annotated[Principal, Depends(require_scope("finance"))]
OpsStaff = Annotated[Principal, Depends(require_scope("ops"))]
BillingReader = Annotated[Principal, Depends(require_scope("billing:read"))]
