"""The served OpenAPI document says what the service really answers.

FastAPI documents errors its own way: validation errors as `HTTPValidationError` under
`application/json`, and a route's declared error models under the route's default media type.
This service answers every error as RFC 9457 `application/problem+json` (app/errors.py), so the
document is rewritten to match, for every route, including routes added later:

- every 4xx/5xx response is `application/problem+json` with the `Problem` schema;
- 422 (FastAPI's request validation) is a `Problem` with code `validation_error`, also on
  routes that declare 422 codes of their own (`refund_exceeds_limit`, ...);
- routes with a JSON request body also document 400 (`bad_request`, a body the JSON parser
  cannot read), and every POST/PUT/PATCH documents 413 (`payload_too_large`, over 1 MiB): the
  framework and the body-size limit answer these before the route runs;
- routes behind a bearer token document 401 (`unauthorized`), which the auth dependency
  answers, and 503 (`service_unavailable`), answered while the database is unreachable.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from app.errors import PROBLEM_JSON, Problem

PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
BODY_METHODS = ("post", "put", "patch")
FRAMEWORK_SCHEMAS = ("HTTPValidationError", "ValidationError")
GENERIC = {
    "400": "Malformed request body (`bad_request`)",
    "401": "Authentication required (`unauthorized`)",
    "413": "Request body too large (`payload_too_large`)",
    "422": "Validation error (`validation_error`)",
    "503": "The database is unavailable (`service_unavailable`, with `Retry-After`)",
}


def problem_details_in_openapi(document: dict[str, Any]) -> dict[str, Any]:
    """Rewrite `document` (in place, and returned) as described in the module docstring."""
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas.setdefault(
        "Problem", Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    )
    for operations in document.get("paths", {}).values():
        for method, operation in operations.items():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            responses: dict[str, Any] = operation["responses"]
            if "requestBody" in operation:
                responses.setdefault("400", {"description": GENERIC["400"]})
            if "requestBody" in operation or method in BODY_METHODS:
                responses.setdefault("413", {"description": GENERIC["413"]})
            if operation.get("security"):
                responses.setdefault("401", {"description": GENERIC["401"]})
                responses.setdefault("503", {"description": GENERIC["503"]})
            for status, response in responses.items():
                if not status.isdigit() or int(status) < 400:
                    continue
                if status == "422" and response.get("description") == "Validation Error":
                    response["description"] = GENERIC["422"]
                elif status == "422" and "`validation_error`" not in response["description"]:
                    # A route declaring its own 422 codes still validates its input.
                    response["description"] = f"{GENERIC['422']} / {response['description']}"
                response["content"] = {PROBLEM_JSON: {"schema": PROBLEM_REF}}
            operation["responses"] = dict(sorted(responses.items()))
    for name in FRAMEWORK_SCHEMAS:
        schemas.pop(name, None)
    return document


class BillingAPI(FastAPI):
    """FastAPI whose OpenAPI document describes the problem+json errors it answers."""

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            self.openapi_schema = problem_details_in_openapi(super().openapi())
        return self.openapi_schema
