"""Robustness tests reuse the checkout fixtures (catalog prices at the fake, `post_checkout`)."""

from tests.checkout.conftest import catalog, post_checkout

__all__ = ["catalog", "post_checkout"]
