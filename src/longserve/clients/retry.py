"""When to retry an HTTP request and how long to wait: exponential backoff with full jitter, or Retry-After.

    policy = RetryPolicy(max_retries=5)
    if policy.should_retry_status(resp.status) and attempt < policy.max_retries:
        await asyncio.sleep(policy.delay(attempt, parse_retry_after(resp.headers.get("Retry-After"))))

Full jitter (a uniform draw in ``[0, min(cap, base * 2**attempt)]``, as in AWS's "Exponential Backoff And
Jitter") spreads the clients that a 503 turned away at the same moment, so they do not all come back together.
A server that says when to come back (``Retry-After``) is believed, up to ``max_retry_after_s``.
"""

from __future__ import annotations

import email.utils
import math
import random
import time
from dataclasses import dataclass

# Overload and transient gateway/server trouble; any other status is the request's own fault and final.
RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    """How many times to retry and how long to wait before each retry."""

    max_retries: int = 5  # retries after the first attempt; 0 sends each request once
    base_s: float = 0.5  # the first backoff window; it doubles per retry
    cap_s: float = 30.0  # the largest backoff window
    max_retry_after_s: float = 300.0  # a larger Retry-After is cut to this, so one header cannot stall a run

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if self.base_s < 0 or self.cap_s < 0 or self.max_retry_after_s < 0:
            raise ValueError("base_s, cap_s and max_retry_after_s must be >= 0")

    @staticmethod
    def should_retry_status(status: int) -> bool:
        return status in RETRYABLE_STATUSES

    def delay(
        self, attempt: int, retry_after_s: float | None = None, rng: random.Random | None = None
    ) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (0 = the first one)."""
        if retry_after_s is not None:
            return min(max(retry_after_s, 0.0), self.max_retry_after_s)
        window = min(self.cap_s, self.base_s * 2.0**attempt)
        return (rng or random).uniform(0.0, window)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """A Retry-After header in seconds: delta-seconds (``"2"``, also ``"0.5"``) or an HTTP date; None if absent
    or unreadable (then the caller backs off on its own)."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(seconds, 0.0) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # an HTTP date is GMT by definition
        return None
    return max(when.timestamp() - (time.time() if now is None else now), 0.0)
