"""The supervisor's worker-process state machine (spoa_mp.worker_process):
which transitions are allowed, and what a death means in each state."""

from __future__ import annotations

import pytest

from spoa_mp import control
from spoa_mp.worker_process import Death, State, TransitionError, WorkerProcess


def proc() -> WorkerProcess:
    return WorkerProcess(index=1, generation=1, pid=4242, channel=None, now=100.0)


def test_a_new_worker_is_starting_and_not_serving() -> None:
    p = proc()
    assert p.state is State.STARTING
    assert not p.served
    assert not p.serving
    assert not p.retiring
    assert p.death() is Death.CRASHED  # died before ready, unasked


def test_ready_then_retire_then_death_is_expected() -> None:
    p = proc()
    p.mark_ready()
    assert p.state is State.READY
    assert p.serving
    assert p.served
    assert p.death() is Death.CRASHED  # a serving worker dying unasked is news
    assert p.retire()
    assert p.state is State.RETIRING
    assert not p.serving
    assert p.served
    assert p.retiring
    assert not p.retire()  # told once is enough
    assert p.death() is Death.EXPECTED


def test_boot_failure_is_reported_as_such() -> None:
    p = proc()
    p.mark_boot_failed("worker start hook failed")
    assert p.state is State.BOOT_FAILED
    assert p.boot_error == "worker start hook failed"
    assert p.death() is Death.BOOT_FAILED
    with pytest.raises(TransitionError):
        p.mark_ready()


def test_a_retired_worker_that_boots_stays_retiring() -> None:
    # a failed reload retires its new workers before they were ready
    p = proc()
    assert p.retire()
    p.mark_ready()
    assert p.state is State.RETIRING
    assert p.served
    assert not p.serving
    assert p.death() is Death.EXPECTED


def test_timeout_kill_means_hung_unless_it_was_told_to_go() -> None:
    p = proc()
    p.mark_ready()
    assert not p.overdue(now=110.0, timeout=30.0)
    assert p.overdue(now=131.0, timeout=30.0)
    p.kill_for_timeout()
    assert p.state is State.KILLED
    assert not p.serving
    assert not p.overdue(now=200.0, timeout=30.0)  # killed once, not again
    assert p.death() is Death.HUNG
    assert not p.retire()  # a killed worker cannot be retired
    with pytest.raises(TransitionError):
        p.kill_for_timeout()

    leaving = proc()
    leaving.mark_ready()
    leaving.retire()
    leaving.kill_for_timeout()  # a wedged retiring worker
    assert leaving.death() is Death.EXPECTED


def test_heartbeats_keep_it_alive() -> None:
    p = proc()
    p.beat(125.0)
    assert not p.overdue(now=150.0, timeout=30.0)
    assert p.overdue(now=156.0, timeout=30.0)


def test_ready_after_kill_is_ignored() -> None:
    p = proc()
    p.kill_for_timeout()
    p.mark_ready()  # a READY still in the channel when it was killed
    assert p.state is State.KILLED
    assert not p.served


# ------------------------------------------------------------------ the handover state


STATE = {
    "phase": 1,
    "max_frame_size": 16380,
    "handshake": {
        "max_frame_size": 16380,
        "pipelining": True,
        "fragmentation": False,
        "engine_id": "e1",
        "haproxy_capabilities": ["pipelining"],
        "healthcheck": False,
    },
}


def test_passed_connection_round_trips_through_a_message() -> None:
    passed = control.PassedConnection.from_message({"peer": "127.0.0.1:1", "state": STATE})
    assert passed.state == STATE
    assert passed.peer == "127.0.0.1:1"
    assert control.PassedConnection.from_message(passed.fields()) == passed


@pytest.mark.parametrize(
    "state",
    [
        None,
        [],
        {**STATE, "phase": "1"},
        {**STATE, "max_frame_size": True},
        {**STATE, "handshake": "x"},
        {**STATE, "handshake": {**STATE["handshake"], "pipelining": 1}},  # type: ignore[dict-item]
    ],
)
def test_a_bad_handover_state_is_refused(state: object) -> None:
    with pytest.raises(ValueError, match="handover state"):
        control.PassedConnection.from_message({"peer": "p", "state": state})


def test_each_message_kind_has_one_meaning() -> None:
    kinds = [
        control.READY, control.BEAT, control.BOOT_ERROR, control.CONNECTION,
        control.HANDED_OVER, control.RECYCLE, control.HAND_OVER, control.ADOPT,
    ]  # fmt: skip
    assert len(set(kinds)) == len(kinds)
