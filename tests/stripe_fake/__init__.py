"""A Stripe fake: real HTTP server + in-memory Stripe validated against the OpenAPI spec.

``simulator.py`` runs the same fake as the local Stripe simulator of ``bin/dev serve``
(webhook delivery in ``delivery.py``, Checkout/Portal/controls pages in ``pages.py``).
"""

from .api import StripeSimulator
from .openapi import (
    ParamError,
    decode_form,
    fixture,
    load_spec,
    match_route,
    object_errors,
    validate_params,
)
from .server import FailureRule, RecordedRequest, StripeFake, event_payload, sign
from .state import API_VERSION, RequestContext, StripeError, spec_event_types

__all__ = [
    "API_VERSION",
    "FailureRule",
    "ParamError",
    "RecordedRequest",
    "RequestContext",
    "StripeError",
    "StripeFake",
    "StripeSimulator",
    "decode_form",
    "event_payload",
    "fixture",
    "load_spec",
    "match_route",
    "object_errors",
    "sign",
    "spec_event_types",
    "validate_params",
]
