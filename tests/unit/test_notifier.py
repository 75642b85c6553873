"""NOTIFY payloads: ids only, always under Postgres's 8000-byte limit."""

from __future__ import annotations

from streaming.notifier import MAX_PAYLOAD, decode, encode


def test_round_trip() -> None:
    payloads = encode({12: 7, 13: 9}, [5, 6], [8])
    assert payloads == ["e 12=7,13=9", "q 5,6", "c 8"]
    merged = [decode(p) for p in payloads]
    assert merged[0].events == {12: 7, 13: 9}
    assert merged[1].queued == [5, 6] and merged[2].cancels == [8]


def test_many_runs_are_split_under_the_limit_and_lose_nothing() -> None:
    events = {run: run * 3 for run in range(1, 5000)}
    payloads = encode(events, [], [])
    assert len(payloads) > 1
    assert all(len(p.encode()) <= MAX_PAYLOAD + 2 for p in payloads)
    back: dict[int, int] = {}
    for p in payloads:
        back.update(decode(p).events)
    assert back == events


def test_malformed_payloads_are_ignored() -> None:
    for bad in ("e x=1", "q a,b", "zzz", "", "e 1=2=3"):
        msg = decode(bad)
        assert not msg.events and not msg.queued and not msg.cancels


def test_the_origin_rides_on_each_payload_and_old_payloads_still_parse() -> None:
    payloads = encode({12: 7}, [5], [8], origin="ab12cd34")
    assert payloads == ["e/ab12cd34 12=7", "q/ab12cd34 5", "c/ab12cd34 8"]
    assert [decode(p).origin for p in payloads] == ["ab12cd34"] * 3
    assert decode(payloads[0]).events == {12: 7}
    legacy = decode("e 12=7")
    assert legacy.origin == "" and legacy.events == {12: 7}
