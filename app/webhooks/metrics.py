"""Prometheus metrics of the Stripe event pipeline."""

from prometheus_client import Counter, Histogram

RECEIVED = Counter("billing_stripe_events_received_total", "Stripe webhook deliveries received")
REJECTED = Counter(
    "billing_stripe_events_rejected_total", "Deliveries refused with 400", ["reason"]
)
DUPLICATES = Counter("billing_stripe_events_duplicate_total", "Deliveries of already stored events")
PROCESSED = Counter("billing_stripe_events_processed_total", "Events applied", ["type"])
FAILED = Counter(
    "billing_stripe_events_failed_total", "Event processing attempts that failed", ["type"]
)
LAG = Histogram(
    "billing_stripe_event_processing_lag_seconds",
    "From receipt to the event's effect being committed",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600),
)
CONFLICTS = Counter(
    "billing_stripe_event_conflicts_total",
    "Event transactions run again after a serialization failure or deadlock",
)
