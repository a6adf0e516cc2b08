"""The ingestion settings: defaults, a bad value names its variable, the secrets stay hidden."""

from __future__ import annotations

import pytest

from workers.core.settings import SettingsError, load_settings


def test_defaults():
    s = load_settings({})
    assert s.broadcastify.api_base == "https://api.bcfy.io"
    assert (s.broadcastify.jwt_lifetime_sec, s.broadcastify.jwt_renew_margin_sec) == (3600, 60)
    assert (s.ingest.min_poll_gap_sec, s.ingest.poll_concurrency) == (5, 4)
    assert s.ingest.backfill_window_sec == 28_800
    assert (s.geo.countries, s.geo.states) == ("US", "")
    assert not s.broadcastify.api_key and not s.broadcastify.password


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"BCFY_API_BASE": "api.bcfy.io"}, "BCFY_API_BASE"),
        ({"BCFY_JWT_LIFETIME_SEC": "90000"}, "BCFY_JWT_LIFETIME_SEC"),
        ({"BCFY_JWT_LIFETIME_SEC": "600", "BCFY_JWT_RENEW_MARGIN_SEC": "400"}, "MARGIN"),
        ({"BCFY_RETRY_ATTEMPTS": "0"}, "BCFY_RETRY_ATTEMPTS"),
        ({"INGEST_BACKFILL_WINDOW_SEC": "30000"}, "INGEST_BACKFILL_WINDOW_SEC"),
        ({"INGEST_LIVE_MAX_POS_AGE_SEC": "30"}, "INGEST_LIVE_MAX_POS_AGE_SEC"),
        ({"INGEST_INTERVAL_SEC": "400"}, "INGEST_LIVE_MAX_POS_AGE_SEC"),
        ({"INGEST_INTERVAL_SEC": "5"}, "INGEST_MIN_POLL_GAP_SEC"),
        ({"INGEST_POLL_CONCURRENCY": "0"}, "INGEST_POLL_CONCURRENCY"),
        ({"GEO_COUNTRIES": "U$"}, "GEO_COUNTRIES"),
        ({"BCFY_RETRY_BACKOFF_SEC": "20"}, "BCFY_RETRY_BACKOFF_SEC"),
    ],
)
def test_a_bad_value_names_its_variable(env, named):
    with pytest.raises(SettingsError, match=named):
        load_settings(env)


def test_code_lists_are_normalised():
    s = load_settings({"GEO_COUNTRIES": " us, can ,", "GEO_STATES": "il,36"})
    assert (s.geo.countries, s.geo.states) == ("US,CAN", "IL,36")


def test_the_api_secret_and_password_are_never_shown():
    s = load_settings({"BCFY_API_KEY": "k3y-s3cret", "BCFY_PASSWORD": "pa55word"})
    shown = repr(s) + str(s.describe())
    assert "k3y-s3cret" not in shown and "pa55word" not in shown
    assert s.describe()["BCFY_API_KEY"] == "***"


def test_the_retry_budget_fits_inside_a_run():
    from workers.clients.broadcastify import retry_budget

    assert retry_budget(load_settings({})) == 60
    # A short soft limit leaves room for fewer retries: the last attempt must end in time.
    s = load_settings({"JOB_SOFT_TIME_LIMIT_SEC": "100", "JOB_TIME_LIMIT_SEC": "120"})
    assert retry_budget(s) == 100 - 60
    s = load_settings({"JOB_SOFT_TIME_LIMIT_SEC": "30", "JOB_TIME_LIMIT_SEC": "40"})
    assert retry_budget(s) == 0  # one attempt, no retry
