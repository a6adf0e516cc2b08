"""The object store's settings: AUDIO_STORE_URL read by S3's bucket naming rules with prefixes
normalised, junk refused naming the variable, and the secret key never shown (settings errors,
describe(), the store's error messages)."""

from __future__ import annotations

import ipaddress
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.audio.store import store_for, work_dir
from workers.audio.store.s3 import S3AudioStore
from workers.core.settings import SettingsError, load_settings, split_store_url

LABEL = st.text(string.ascii_lowercase + string.digits, min_size=1, max_size=12)
BUCKETS = (
    st.lists(st.tuples(LABEL, st.sampled_from(["", "-", "--"])), min_size=1, max_size=5)
    .map(lambda parts: ".".join(label + sep + label for label, sep in parts))
    .filter(lambda b: 3 <= len(b) <= 63)
)
PREFIX_PART = st.text(string.ascii_letters + string.digits + "-_.=", min_size=1, max_size=10)
PREFIXES = st.lists(PREFIX_PART.filter(lambda p: p not in (".", "..")), max_size=4)


def store_url(raw: str) -> str:
    return load_settings({"AUDIO_STORE_URL": raw}).audio.store_url


@settings(max_examples=200, deadline=None)
@given(bucket=BUCKETS, parts=PREFIXES, trailing=st.booleans())
def test_a_valid_bucket_and_prefix_are_read_and_normalised(bucket, parts, trailing):
    try:
        ipaddress.ip_address(bucket)
        return  # an address is not a bucket name: refused below
    except ValueError:
        pass
    raw = "s3://" + "/".join([bucket, *parts]) + ("/" if trailing else "")
    url = store_url(raw)
    assert split_store_url(url) == (bucket, "/".join(parts))
    assert store_url(url) == url, "reading it again changes nothing"


@pytest.mark.parametrize(
    "raw",
    [
        "s3://ab",  # too short
        "s3://" + "a" * 64,
        "s3://My-Bucket",  # upper case
        "s3://bucket_name",
        "s3://-bucket",
        "s3://bucket-",
        "s3://my..bucket",
        "s3://my.-bucket",
        "s3://192.168.1.1",
        "s3://",
        "s3:///prefix",
        "bucket/prefix",
        "https://bucket.s3.amazonaws.com/prefix",
        "s3://bucket/a/../b",
        "s3://bucket/a/./b",
        "s3://bucket/a//b",
        "s3://bucket/p?x=1",
        "s3://bucket/p#frag",
        "s3://key:secret@bucket/p",
        "s3://bucket/a\nb",
    ],
)
def test_a_bad_store_url_is_refused_naming_the_variable(raw):
    with pytest.raises(SettingsError, match="AUDIO_STORE_URL"):
        store_url(raw)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_any_text_is_read_as_a_store_url_or_refused_naming_the_variable(raw):
    try:
        url = store_url(raw)
    except SettingsError as exc:
        assert "AUDIO_STORE_URL" in str(exc)
        return
    if not raw.strip():
        assert url == ""
        return
    bucket, prefix = split_store_url(url)
    assert url.startswith("s3://") and 3 <= len(bucket) <= 63
    assert all(part not in ("", ".", "..") for part in prefix.split("/") if prefix)


# Marked, so that no setting's name or value contains one by chance.
SECRETS = st.text(string.ascii_letters + string.digits + "+/=-_", min_size=10, max_size=40).map(
    lambda t: f"zq{t}qz"
)


@settings(max_examples=100, deadline=None)
@given(
    secret=SECRETS,
    bad=st.sampled_from(
        [
            {"AUDIO_S3_ACCESS_KEY_ID": ""},  # a secret without its key id
            {"AUDIO_S3_LINK_TTL_SEC": "0"},
            {"AUDIO_STORE_URL": "s3://Bad"},
            {"AUDIO_S3_PATH_STYLE": "sometimes"},
            {"AUDIO_S3_ENDPOINT": "ftp://x"},
        ]
    ),
)
def test_the_secret_key_is_never_shown(secret, bad):
    env = {
        "AUDIO_STORE_URL": "s3://audio/calls",
        "AUDIO_S3_ACCESS_KEY_ID": "AKIDEXAMPLE",
        "AUDIO_S3_SECRET_ACCESS_KEY": secret,
    }
    s = load_settings(env)
    assert secret not in repr(s) + str(s.describe())
    assert s.describe()["AUDIO_S3_SECRET_ACCESS_KEY"] == "***"
    with pytest.raises(SettingsError) as caught:
        load_settings(env | bad)
    assert secret not in str(caught.value)
    # In an endpoint URL by mistake: refused, and not echoed.
    with pytest.raises(SettingsError) as caught:
        load_settings(env | {"AUDIO_S3_ENDPOINT": f"http://AKIDEXAMPLE:{secret}@s3.local"})
    assert "AUDIO_S3_ENDPOINT" in str(caught.value) and secret not in str(caught.value)
    with pytest.raises(SettingsError) as caught:
        load_settings(env | {"AUDIO_STORE_URL": f"s3://AKIDEXAMPLE:{secret}@audio/calls"})
    assert "AUDIO_STORE_URL" in str(caught.value) and secret not in str(caught.value)
    # The store's errors: obstore's messages are scrubbed of it whatever they hold.
    store = store_for(s)
    assert isinstance(store, S3AudioStore)
    for status in ("403 Forbidden", "500 Internal Server Error", "404 Not Found"):
        text = f"Error performing GET http://s3/audio?x={secret} - status code: {status} {secret}"
        assert secret not in str(store.failure(Exception(text), "reading"))


def test_the_work_directory_is_beside_the_files_or_local_to_the_host():
    fs = load_settings({"AUDIO_STORE_DIR": "/srv/audio"}).audio
    assert str(work_dir(fs)) == "/srv/audio/.tmp"
    s3 = load_settings({"AUDIO_STORE_URL": "s3://audio"}).audio
    assert work_dir(s3).name == "bcfy-audio-work" and "/srv" not in str(work_dir(s3))
    given_dir = load_settings({"AUDIO_STORE_URL": "s3://audio", "AUDIO_WORK_DIR": "/w"}).audio
    assert str(work_dir(given_dir)) == "/w"
