"""1msg billing service."""
