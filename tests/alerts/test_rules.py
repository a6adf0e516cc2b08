"""`bcfy alerts`: rules managed from the command line, read as `bcfy search` reads queries, with
target URLs never shown whole."""

from __future__ import annotations

import pytest

TOKEN = "T0KEN-5ecret-77"


def test_add_list_show_disable_enable_remove(alerts, receiver):
    webhook = receiver.url(f"/hook/{TOKEN}")
    apprise = f"json://user:{TOKEN}@127.0.0.1:{receiver.port}/apprise/{TOKEN}"
    code, out, err = alerts.cli(
        "add", "fire", "--query", '"structure fire" or "working fire"', "--playlist",
        "County Fire", "--group", "7001-101", "--min-confidence", "0.5",
        "--notify", webhook, "--notify", apprise,
    )  # fmt: skip
    assert code == 0, err
    assert "'structur' <-> 'fire' | 'work' <-> 'fire'" in out  # stemmed, phrases in order
    assert f"http://127.0.0.1:{receiver.port}/…" in out
    assert "json://…" in out  # with user information, not even the host
    assert TOKEN not in out + err

    code, out, _ = alerts.cli("list")
    assert code == 0
    assert out.startswith('fire  on  \'"structure fire" or "working fire"\'')
    assert "group 7001-101" in out and "confidence >= 0.5" in out and "targets 2" in out

    code, out, _ = alerts.cli("show", "fire")
    assert code == 0 and TOKEN not in out
    assert "rule fire (enabled)" in out and "group       7001-101" in out
    assert out.count("  ok") == 2

    assert alerts.cli("disable", "fire")[0] == 0
    assert "fire  off" in alerts.cli("list")[1]
    assert alerts.cli("enable", "fire")[0] == 0
    assert "fire  on" in alerts.cli("list")[1]
    assert alerts.cli("remove", "fire")[0] == 0
    assert "no alert rules" in alerts.cli("list")[1]
    code, _, err = alerts.cli("show", "fire")
    assert code == 2 and "no rule named 'fire'" in err


@pytest.mark.parametrize(
    ("query", "why"),
    [
        ("the of and", "has no words to look for"),
        ("?!, ...", "has no words to look for"),
        ("-fire -smoke", "only excludes words"),
        ("   ", "the query is empty"),
    ],
)
def test_a_query_that_cannot_be_read_is_refused(alerts, receiver, query, why):
    code, out, err = alerts.cli("add", "bad", "--query", query, "--notify", receiver.url())
    assert code == 2
    assert why in err and out == ""
    assert alerts.rows("SELECT * FROM alert_rules") == []


def test_search_refuses_the_same_queries(alerts, capsys):
    from workers.cli.main import main

    assert main(["search", "--", "-fire"]) == 2
    assert "only excludes words" in capsys.readouterr().err


def test_bad_targets_playlists_and_confidence_are_refused_without_showing_the_url(alerts):
    code, _, err = alerts.cli(
        "add", "x", "--query", "fire", "--notify", f"nosuchscheme://{TOKEN}@host/{TOKEN}"
    )
    assert code == 2 and "not a URL Apprise can send to" in err and TOKEN not in err
    code, _, err = alerts.cli("add", "x", "--query", "fire", "--notify", f"{TOKEN}")
    assert code == 2 and "must be a URL" in err and TOKEN not in err
    code, _, err = alerts.cli(
        "add", "x", "--query", "fire", "--playlist", "Nowhere PD", "--notify", "json://h/x"
    )
    assert code == 2 and "no followed playlist" in err
    with pytest.raises(SystemExit):
        alerts.cli("add", "x", "--query", "fire", "--min-confidence", "2", "--notify", "json://h")
    assert alerts.rows("SELECT * FROM alert_rules") == []


def test_a_second_rule_of_the_same_name_is_refused(alerts, receiver):
    alerts.add("fire", "fire", receiver.url())
    code, _, err = alerts.cli("add", "fire", "--query", "smoke", "--notify", receiver.url())
    assert code == 2 and "a rule named 'fire' exists" in err


def test_test_sends_a_sample_to_every_target_and_says_which_failed(alerts, receiver):
    receiver.answer("/broken", (500, {}))
    alerts.add(
        "fire",
        "fire",
        receiver.url(f"/hook/{TOKEN}"),
        f"json://127.0.0.1:{receiver.port}/apprise",
        receiver.url("/broken"),
    )
    code, out, err = alerts.cli("test", "fire")
    assert code == 1
    assert TOKEN not in out + err
    lines = out.splitlines()
    assert lines == [
        f"http://127.0.0.1:{receiver.port}/…  sent",
        f"json://127.0.0.1:{receiver.port}/…  sent",
        f"http://127.0.0.1:{receiver.port}/…  FAILED: HTTP 500",
    ]
    assert receiver.to(f"/hook/{TOKEN}")[0].body["test"] is True
    apprise = receiver.to("/apprise")[0]
    assert apprise.body["title"] == "bcfy alert fire: test" and apprise.key
