"""The one backoff (workers.core.backoff), shared by the audio and transcription stages: it
doubles from its base, spreads the waits by its jitter, honours Retry-After and never passes
its cap, whatever the attempt number and the service's answer."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from workers.core.backoff import JITTER, backoff_sec


@settings(max_examples=300, deadline=None)
@given(
    attempt=st.integers(min_value=-5, max_value=5000),
    base=st.floats(min_value=0, max_value=1e4, allow_nan=False),
    cap=st.floats(min_value=0, max_value=1e6, allow_nan=False),
    retry_after=st.none() | st.floats(min_value=0, max_value=1e9, allow_nan=False),
)
def test_a_wait_is_never_past_the_cap_nor_shorter_than_asked(attempt, base, cap, retry_after):
    wait = backoff_sec(attempt, base, cap, retry_after)
    assert 0 <= wait <= cap
    if retry_after is not None:
        assert wait >= min(retry_after, cap) - 0.05
    exponential = base * 2.0 ** min(max(attempt - 1, 0), 1000)
    if retry_after is None and exponential * (1 + JITTER) < cap:
        assert exponential * (1 - JITTER) - 0.05 <= wait <= exponential * (1 + JITTER) + 0.05


def test_waits_double_and_are_spread():
    firsts = {backoff_sec(1, 30, 3600) for _ in range(200)}
    assert all(24 <= w <= 36 for w in firsts)
    assert len(firsts) > 10, "calls that failed together are not all tried again at once"
    assert all(48 <= backoff_sec(2, 30, 3600) <= 72 for _ in range(50))
    assert backoff_sec(30, 30, 3600) == 3600
