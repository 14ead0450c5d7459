"""Dependencies of the routes, as `Annotated` aliases that keep route signatures short.

`SettingsDep` and `StoreDep` come from the app (so that tests build an app per settings);
`CallerDep` is who is calling. Authentication: `Authorization: Bearer <key>`, compared in
constant time against every configured key. With no key configured the API is open, the
caller has no owner id and may do everything. A key is never logged or stored: a caller is
known by the first 16 hex digits of the key's SHA-256.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import TypeAdapter, ValidationError

from service.config import Settings
from service.errors import Forbidden, Unauthorized
from service.store import Store


def app_settings(request: Request) -> Settings:
    return request.app.state.settings


def app_store(request: Request) -> Store:
    return request.app.state.store


# `async def` although they do not await: FastAPI runs a plain `def` dependency in the
# thread pool, a hop that costs more than the dependency itself on every request. And every
# dependency costs ~0.1 ms of solving per request: the hot routes (submit, poll) call
# app_settings/app_store on their request instead.
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_store(request: Request) -> Store:
    return request.app.state.store


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]


@dataclass(frozen=True)
class Caller:
    owner: str | None  # None: the API is open (no keys configured)
    admin: bool


def owner_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _matches(key_hash: bytes, keys: list[str]) -> bool:
    """Constant time in the key: every configured key is compared, equal-length hashes."""
    found = False
    for candidate in keys:
        found |= hmac.compare_digest(key_hash, hashlib.sha256(candidate.encode()).digest())
    return found


_bearer = HTTPBearer(auto_error=False, description="an API key (SMOOTHCERT_API_KEYS)")


async def get_caller(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Caller:
    settings = app_settings(request)
    if not settings.api_keys:
        return Caller(owner=None, admin=True)
    if credentials is None or not credentials.credentials:
        raise Unauthorized("this API needs a key: send the header 'Authorization: Bearer <key>'")
    key = credentials.credentials
    key_hash = hashlib.sha256(key.encode()).digest()
    if not _matches(key_hash, settings.api_keys):
        raise Unauthorized("the API key is not valid")
    return Caller(owner=owner_id(key), admin=_matches(key_hash, settings.admin_keys))


CallerDep = Annotated[Caller, Depends(get_caller)]


async def require_admin(caller: CallerDep) -> Caller:
    if not caller.admin:
        raise Forbidden("this operation needs an admin key (SMOOTHCERT_ADMIN_KEYS)")
    return caller


AdminDep = Annotated[Caller, Depends(require_admin)]


IDEMPOTENCY_KEY = "Idempotency-Key"
_IDEMPOTENCY_KEY_DOC = "a retried POST with the same key returns the same job"
_IDEMPOTENCY_KEY_LENGTH = (1, 255)

IdempotencyKeyDep = Annotated[
    str | None,
    Header(alias=IDEMPOTENCY_KEY, min_length=_IDEMPOTENCY_KEY_LENGTH[0], max_length=_IDEMPOTENCY_KEY_LENGTH[1],
           description=_IDEMPOTENCY_KEY_DOC),
]


# --- the submit routes, without dependencies ------------------------------------------
# FastAPI's solving of `caller: CallerDep, idempotency_key: IdempotencyKeyDep` took about a
# tenth of a submission's CPU instructions (BENCHMARKS.md, section 5). The submit routes
# (job_routes) call these two instead, which do exactly what that solving does: the same
# `_bearer` and `get_caller` (so a 401 comes first), then the header's first value checked
# by the same rules into the same 422. `submit_openapi()` documents them as the declarations
# would (tests/service/test_job_routes.py compares both with a route that declares them).


async def read_caller(request: Request) -> Caller:
    """What `CallerDep` gives a route."""
    return await get_caller(request, await _bearer(request))


_idempotency_key = TypeAdapter(IdempotencyKeyDep)


def read_idempotency_key(request: Request) -> str | None:
    """What `IdempotencyKeyDep` gives a route, or the RequestValidationError it raises."""
    try:
        return _idempotency_key.validate_python(request.headers.get(IDEMPOTENCY_KEY))
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("header", IDEMPOTENCY_KEY, *e["loc"])}
                                      for e in exc.errors(include_url=False)]) from None


def submit_openapi() -> dict[str, Any]:
    """The OpenAPI `security` and `parameters` of a route declaring `CallerDep` and
    `IdempotencyKeyDep`, for a route's `openapi_extra` (a new dict each time)."""
    return {
        "security": [{_bearer.scheme_name: []}],
        "parameters": [{
            "name": IDEMPOTENCY_KEY, "in": "header", "required": False, "description": _IDEMPOTENCY_KEY_DOC,
            "schema": {"anyOf": [{"type": "string", "minLength": _IDEMPOTENCY_KEY_LENGTH[0],
                                  "maxLength": _IDEMPOTENCY_KEY_LENGTH[1]}, {"type": "null"}],
                       "description": _IDEMPOTENCY_KEY_DOC, "title": IDEMPOTENCY_KEY},
        }],
    }
