"""Target URLs are secrets: what commands, logs and status show of one never holds its user
information, path or query, whatever the URL looks like (property tests)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from workers.alerts.targets import shown_target

SCHEMES = st.sampled_from(["https", "http", "json", "jsons", "form", "xml", "discord", "tgram"])
TOKEN = st.text(alphabet="ABCDEFGHJKLMNPQRSTUVWXYZ23456789", min_size=12, max_size=30)
ANY = st.text(max_size=40)


@given(SCHEMES, TOKEN, ANY, ANY)
def test_no_token_is_shown_wherever_it_sits(scheme, token, before, after):
    for url in (
        f"{scheme}://user:{token}@hooks.example/{before}",
        f"{scheme}://{token}@hooks.example:8080/x",
        f"{scheme}://hooks.example/{before}{token}{after}",
        f"{scheme}://hooks.example/x?token={token}&{after}",
        f"{scheme}://hooks.example/x#{token}",
        f"{scheme}://user:{before}{token}{after}@hooks.example/",
    ):
        shown = shown_target(url)
        assert token.lower() not in shown.lower(), (url, shown)
        assert shown.startswith(f"{scheme}://") and shown.endswith("…")


@given(ANY)
def test_any_text_is_shown_without_raising(text):
    assert shown_target(text)


def test_web_hooks_show_their_host_and_port():
    assert shown_target("https://hooks.example:8443/t/abc?k=v") == "https://hooks.example:8443/…"
    # With user information, not even the host: a parser may take part of a password for it.
    assert shown_target("https://user:pw@hooks.example:8443/t") == "https://…"
    assert shown_target("json://10.0.0.5:8080/path") == "json://10.0.0.5:8080/…"
    assert shown_target("discord://1234/abcd") == "discord://…"
