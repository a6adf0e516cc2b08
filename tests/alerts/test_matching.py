"""Matching in the transaction that stores the transcript: the rules' queries read as `bcfy
search` reads them (phrases, stemming, or), their playlist, group and confidence filters, one
outbox row per rule and call, and ALERT_MAX_PER_MINUTE."""

from __future__ import annotations

from tests.alerts.conftest import FIRE, POLICE


def matched(alerts) -> set[tuple[str, int]]:
    return {(rule, call) for rule, call, _ in alerts.outbox()}


def test_phrases_stemming_and_or_match_as_search_does(alerts, receiver):
    alerts.add("phrase", '"structure fire"', receiver.url())
    alerts.add("stem", "fires", receiver.url())
    alerts.add("either", '"working fire" or "smoke showing"', receiver.url())
    in_order = alerts.call("engine twelve respond to a structure fire on oak avenue")
    apart = alerts.call("the fire is under control at the structure")
    plural = alerts.call("two fires reported, smoke showing from the roof")
    nothing = alerts.call("medic three en route to the hospital")
    assert matched(alerts) == {
        ("phrase", in_order),
        ("stem", in_order),
        ("stem", apart),
        ("stem", plural),
        ("either", plural),
    }
    assert nothing not in {call for _, call in matched(alerts)}
    # One delivery per matched rule and target, due at once.
    assert [d[2] for d in alerts.deliveries()] == ["pending"] * 5


def test_playlist_group_and_confidence_filters(alerts, receiver):
    alerts.add("county", "fire", receiver.url(), playlist="County Fire")
    alerts.add("metro", "fire", receiver.url(), playlist=str(POLICE))
    alerts.add("tac", "fire", receiver.url(), group="7001-102")
    alerts.add("sure", "fire", receiver.url(), min_confidence="0.8")
    county = alerts.call("fire on main street", playlist=FIRE, group="7001-101", confidence=0.9)
    metro = alerts.call("fire alarm at the bank", playlist=POLICE, confidence=0.5)
    tac = alerts.call("fire tac two", playlist=FIRE, group="7001-102", confidence=None)
    assert matched(alerts) == {
        ("county", county),
        ("sure", county),
        ("metro", metro),
        ("county", tac),
        ("tac", tac),
    }


def test_a_disabled_rule_matches_nothing_until_enabled(alerts, receiver):
    alerts.add("fire", "fire", receiver.url())
    alerts.cli("disable", "fire")
    alerts.call("fire on main street")
    assert matched(alerts) == set()
    alerts.cli("enable", "fire")
    second = alerts.call("fire on elm street")
    assert matched(alerts) == {("fire", second)}


def test_a_call_finished_twice_is_matched_once(alerts, receiver):
    """Two transcription workers finishing the same call, or a redelivered task: the second
    stores nothing (transcripts.call_id is unique) and matches nothing."""
    alerts.add("fire", "fire", receiver.url(), f"json://127.0.0.1:{receiver.port}/a")
    call = alerts.call("structure fire")
    again = alerts.store(call, "structure fire, second recognition")
    assert not again.inserted and again.alerts_due == 0
    assert alerts.outbox() == [("fire", call, "notify")]
    assert len(alerts.deliveries()) == 2
    alerts.deliver()
    alerts.deliver()
    assert len(receiver.requests) == 2  # one per target


def test_a_burst_over_the_limit_is_summed_up_in_one_message(alerts, receiver):
    alerts.set_env(ALERT_MAX_PER_MINUTE="2")
    alerts.add("fire", "fire", receiver.url())
    calls = [alerts.call(f"fire number {n}") for n in range(7)]
    assert [state for _, _, state in alerts.outbox()] == ["notify"] * 2 + ["throttled"] * 5
    alerts.deliver()
    assert len(receiver.requests) == 2
    # Within the minute the sweep sends nothing more.
    assert alerts.sweep().summaries == 0
    assert alerts.deliver() == {}
    # The minute over, one message sums up the rest.
    with alerts.services.db() as conn:
        conn.execute("UPDATE alert_rules SET window_start = window_start - interval '61 s'")
    assert alerts.sweep().summaries == 1
    alerts.deliver()
    assert len(receiver.requests) == 3
    summary = receiver.requests[-1].body
    assert summary["summary"] is True and summary["more_calls"] == 5
    assert [r.body["call_id"] for r in receiver.requests[:2]] == calls[:2]
    states = [state for _, _, state in alerts.outbox()]
    assert states == ["notify"] * 2 + ["summarized"] * 5 + ["summary"]
    # The summary counts against the new minute: one more call is sent, the next throttled.
    alerts.call("fire number 8")
    alerts.call("fire number 9")
    assert [state for _, _, state in alerts.outbox()][-2:] == ["notify", "throttled"]
