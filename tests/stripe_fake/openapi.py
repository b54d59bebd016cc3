"""Stripe OpenAPI description: route matching, form decoding, coercion and validation.

Everything here is pure (no I/O besides loading the spec once) so it can be reused by
other tools, e.g. a local simulator or a contract test of recorded requests.
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import jsonschema
import jsonschema.exceptions

SPEC_PATH = Path(
    os.environ.get("STRIPE_OPENAPI_PATH", "/work/shared/stripe/stripe-openapi-subset.json")
)
FIXTURES_PATH = Path(
    os.environ.get("STRIPE_FIXTURES_PATH", "/work/shared/stripe/stripe-fixtures.json")
)
FORM = "application/x-www-form-urlencoded"

Json = dict[str, Any]


class ParamError(Exception):
    """A request parameter problem, reported as Stripe's invalid_request_error."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@lru_cache(maxsize=1)
def load_spec() -> Json:
    with SPEC_PATH.open(encoding="utf-8") as fh:
        spec: Json = json.load(fh)
    return spec


@lru_cache(maxsize=1)
def load_fixtures() -> dict[str, Json]:
    with FIXTURES_PATH.open(encoding="utf-8") as fh:
        resources: dict[str, Json] = json.load(fh)["resources"]
    return resources


def fixture(object_type: str) -> Json:
    """A deep copy of Stripe's example object for ``object_type``."""
    return copy.deepcopy(load_fixtures()[object_type])


# --------------------------------------------------------------------------- routing


@dataclass(frozen=True)
class Route:
    template: str
    method: str  # lower case
    regex: re.Pattern[str]
    param_names: tuple[str, ...]
    operation: Json = field(compare=False, hash=False)


@lru_cache(maxsize=1)
def _routes() -> list[Route]:
    routes: list[Route] = []
    for template, item in load_spec()["paths"].items():
        names = tuple(re.findall(r"{([^}]+)}", template))
        pattern = "^" + re.sub(r"\\{[^}]+\\}", "([^/]+)", re.escape(template)) + "$"
        for method, operation in item.items():
            if method in {"get", "post", "delete"}:
                routes.append(Route(template, method, re.compile(pattern), names, operation))
    # literal segments win over templated ones (/v1/customers/search vs /v1/customers/{customer})
    routes.sort(key=lambda r: (len(r.param_names), r.template))
    return routes


def match_route(method: str, path: str) -> tuple[Route, dict[str, str]] | None:
    """Find the operation for ``method`` + ``path``; None when the spec has none."""
    method = method.lower()
    for route in _routes():
        if route.method != method:
            continue
        m = route.regex.match(path)
        if m:
            return route, dict(zip(route.param_names, m.groups(), strict=True))
    return None


def path_exists(path: str) -> bool:
    return any(r.regex.match(path) for r in _routes())


# --------------------------------------------------------------------------- decoding


def _split_key(key: str) -> list[str]:
    """``a[b][0][c]`` -> ["a", "b", "0", "c"]; ``expand[]`` -> ["expand", ""]."""
    m = re.match(r"^([^\[]*)((?:\[[^\]]*\])*)$", key)
    if not m:
        return [key]
    head, rest = m.groups()
    return [head, *re.findall(r"\[([^\]]*)\]", rest)]


def decode_form(raw: str | bytes) -> Json:
    """Decode Stripe's form encoding into nested dicts.

    Lists stay dicts keyed by index strings here; :func:`coerce` turns them into lists
    where the schema says ``array`` (so ``metadata[0]=x`` stays a mapping).
    """
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8")
    result: Json = {}
    for key, value in parse_qsl(raw, keep_blank_values=True):
        parts = _split_key(key)
        node: Any = result
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if part == "":  # a[]=x: append
                part = str(len(node))
            if last:
                node[part] = value
            else:
                nxt = node.get(part)
                if not isinstance(nxt, dict):
                    nxt = {}
                    node[part] = nxt
                node = nxt
    return result


# --------------------------------------------------------------------------- schemas


def resolve(schema: Json) -> Json:
    """Follow a local ``$ref`` (one level at a time, recursively)."""
    while "$ref" in schema:
        ref: str = schema["$ref"]
        node: Any = load_spec()
        for part in ref.lstrip("#/").split("/"):
            node = node[part]
        schema = node
    return schema


def _alternatives(schema: Json) -> list[Json] | None:
    alts = schema.get("anyOf") or schema.get("oneOf")
    return [resolve(a) for a in alts] if alts else None


def _is_closed_object(schema: Json) -> bool:
    return "properties" in schema and "additionalProperties" not in schema


def to_json_schema(schema: Any, *, closed: bool) -> Any:
    """Convert an OpenAPI 3.0 schema to JSON Schema.

    ``nullable: true`` becomes ``anyOf [..., null]``; with ``closed`` every object schema
    that lists ``properties`` but says nothing about ``additionalProperties`` rejects
    unknown keys (Stripe's behaviour for request parameters). ``$ref`` is kept (responses)
    and resolved by the validator against the spec's components.
    """
    if isinstance(schema, list):
        return [to_json_schema(s, closed=closed) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: Json = {}
    for key, value in schema.items():
        if key in {
            "description",
            "title",
            "x-expansionResources",
            "x-stripeBypassValidation",
            "x-stripeResource",
            "x-stripeMostCommon",
            "x-stripeParam",
            "x-resourceId",
            "nullable",
            "format",
        }:
            continue
        if key in {"properties", "patternProperties"}:
            out[key] = {k: to_json_schema(v, closed=closed) for k, v in value.items()}
        elif key in {"items", "additionalProperties", "not"} or key in {"anyOf", "oneOf", "allOf"}:
            out[key] = to_json_schema(value, closed=closed)
        else:
            out[key] = value
    if "oneOf" in out:  # Stripe's oneOf branches often overlap; anyOf is what it means
        out["anyOf"] = out.pop("oneOf")
    if closed and _is_closed_object(schema):
        out["additionalProperties"] = False
    if schema.get("nullable"):
        out = {"anyOf": [out, {"type": "null"}]}
    return out


@lru_cache(maxsize=1)
def response_root() -> Json:
    """JSON-Schema version of the spec's components (open objects, nullable handled)."""
    schemas = load_spec()["components"]["schemas"]
    return {
        "components": {
            "schemas": {
                name: to_json_schema(schema, closed=False) for name, schema in schemas.items()
            }
        }
    }


def object_validator(schema_name: str) -> jsonschema.protocols.Validator:
    root = dict(response_root())
    root["$ref"] = f"#/components/schemas/{schema_name}"
    cls = jsonschema.validators.validator_for(root, default=jsonschema.Draft202012Validator)
    validator: jsonschema.protocols.Validator = cls(root)
    return validator


def object_errors(schema_name: str, obj: Json) -> list[str]:
    """Validation problems of ``obj`` against ``components.schemas[schema_name]``."""
    errors = []
    for err in object_validator(schema_name).iter_errors(obj):
        path = ".".join(str(p) for p in err.absolute_path) or "<root>"
        errors.append(f"{path}: {err.message[:300]}")
    return errors


# --------------------------------------------------------------------------- coercion


_INT_RE = re.compile(r"^-?\d+$")
_NUM_RE = re.compile(r"^-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _coerce_scalar(value: Any, type_: str | None) -> Any:
    if not isinstance(value, str):
        return value
    if type_ == "integer" and _INT_RE.match(value):
        return int(value)
    if type_ == "number" and _NUM_RE.match(value):
        num = float(value)
        return (
            int(num) if num.is_integer() and "." not in value and "e" not in value.lower() else num
        )
    if type_ == "boolean" and value in {"true", "false"}:
        return value == "true"
    return value


def _is_index_dict(value: Any) -> bool:
    return isinstance(value, dict) and all(_INT_RE.match(k) for k in value)


def coerce(value: Any, schema: Json) -> Any:
    """Turn decoded form strings into the types ``schema`` asks for."""
    schema = resolve(schema)
    alts = _alternatives(schema)
    if alts is not None:
        if isinstance(value, str) and value == "":
            for alt in alts:
                if alt.get("enum") == [""] or "" in alt.get("enum", []):
                    return ""
        candidates = []
        for alt in alts:
            candidate = coerce(value, alt)
            candidates.append(candidate)
            if jsonschema.Draft202012Validator(to_json_schema(alt, closed=True)).is_valid(
                candidate
            ):
                return candidate
        # nothing validates: pick the branch that best matches the value's shape
        for alt, candidate in zip(alts, candidates, strict=True):
            if isinstance(value, dict) and alt.get("type") == "object":
                return candidate
            if isinstance(value, dict) and alt.get("type") == "array" and _is_index_dict(value):
                return candidate
        for alt, candidate in zip(alts, candidates, strict=True):
            if candidate is not value or alt.get("type") == "string":
                return candidate
        return value
    type_ = schema.get("type")
    if type_ == "array":
        if _is_index_dict(value):
            value = [value[k] for k in sorted(value, key=int)]
        if isinstance(value, list):
            return [coerce(v, schema.get("items", {})) for v in value]
        return value
    if type_ == "object" or "properties" in schema:
        if not isinstance(value, dict):
            return value
        props: Json = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        out = {}
        for k, v in value.items():
            if k in props:
                out[k] = coerce(v, props[k])
            elif isinstance(extra, dict):
                out[k] = coerce(v, extra)
            else:
                out[k] = v
        return out
    return _coerce_scalar(value, type_)


# --------------------------------------------------------------------------- validation


def _param_name(path: list[str | int]) -> str:
    if not path:
        return ""
    head, *rest = [str(p) for p in path]
    return head + "".join(f"[{p}]" for p in rest)


def _find_unknown(value: Any, schema: Json, path: list[str | int]) -> list[str | int] | None:
    """Path of the first parameter not named by ``schema`` (closed objects only)."""
    schema = resolve(schema)
    alts = _alternatives(schema)
    if alts is not None:
        if isinstance(value, dict):
            objs = [a for a in alts if a.get("type") == "object" or "properties" in a]
            found: list[str | int] | None = None
            for alt in objs:
                found = _find_unknown(value, alt, path)
                if found is None:
                    return None
            return found
        if isinstance(value, list):
            for alt in alts:
                if alt.get("type") == "array":
                    return _find_unknown(value, alt, path)
        return None
    if isinstance(value, dict) and (schema.get("type") == "object" or "properties" in schema):
        props: Json = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for k, v in value.items():
            if k in props:
                found = _find_unknown(v, props[k], [*path, k])
                if found is not None:
                    return found
            elif isinstance(extra, dict):
                found = _find_unknown(v, extra, [*path, k])
                if found is not None:
                    return found
            elif extra is False or (extra is None and "properties" in schema):
                return [*path, k]
        return None
    if isinstance(value, list) and schema.get("type") == "array":
        for i, item in enumerate(value):
            found = _find_unknown(item, schema.get("items", {}), [*path, i])
            if found is not None:
                return found
    return None


def _deepest(err: jsonschema.exceptions.ValidationError) -> jsonschema.exceptions.ValidationError:
    """Pick the most specific error inside anyOf failures (longest path wins)."""
    best = err
    for sub in err.context or []:
        cand = _deepest(sub)
        if len(cand.absolute_path) > len(best.absolute_path):
            best = cand
    return best


@lru_cache(maxsize=512)
def _params_schema_cached(template: str, method: str) -> str:
    operation = load_spec()["paths"][template][method]
    properties: Json = {}
    required: list[str] = []
    for param in operation.get("parameters", []):
        if param.get("in") == "query":
            properties[param["name"]] = param.get("schema", {})
            if param.get("required"):
                required.append(param["name"])
    body = operation.get("requestBody", {}).get("content", {}).get(FORM, {}).get("schema", {})
    properties.update(body.get("properties", {}))
    required.extend(body.get("required", []))
    schema: Json = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return json.dumps(schema)


def params_schema(route: Route) -> Json:
    """One object schema for all of an operation's parameters (query + form body).

    The SDK sends GET/DELETE parameters in the query string even where the spec
    describes a form body (e.g. DELETE /v1/subscriptions/{id}), so both are merged.
    """
    loaded: Json = json.loads(_params_schema_cached(route.template, route.method))
    return loaded


def validate_params(route: Route, raw: Json) -> Json:
    """Coerce and validate decoded params; raise :class:`ParamError` like Stripe."""
    schema = params_schema(route)
    params = coerce(raw, schema)
    unknown = _find_unknown(params, schema, [])
    if unknown is not None:
        name = _param_name(unknown)
        raise ParamError(f"Received unknown parameter: {name}", name)
    validator = jsonschema.Draft202012Validator(to_json_schema(schema, closed=True))
    error = jsonschema.exceptions.best_match(validator.iter_errors(params))
    if error is not None:
        error = _deepest(error)
        path = list(error.absolute_path)
        if error.validator == "required" and isinstance(error.instance, dict):
            missing = re.findall(r"'([^']+)' is a required property", error.message)
            name = _param_name([*path, *missing[:1]])
            raise ParamError(f"Missing required param: {name}.", name)
        name = _param_name(path)
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            extra = re.findall(r"'([^']+)' was unexpected", error.message)
            name = _param_name([*path, *extra[:1]])
            raise ParamError(f"Received unknown parameter: {name}", name)
        if error.validator == "enum":
            allowed = ", ".join(repr(v) for v in error.validator_value)
            raise ParamError(f"Invalid {name}: must be one of {allowed}", name)
        raise ParamError(f"Invalid {name or 'request'}: {error.message}", name or None)
    result: Json = params
    return result
