"""The engine's thread tuner keeps the thread count whose measured decode steps are fastest."""

from __future__ import annotations

from deltaserve.engine.threads import ThreadTuner


def drive(tuner: ThreadTuner, cost: dict[int, float], steps: int, active: list[int]) -> None:
    for _ in range(steps):
        tuner.before_step()
        n = active[-1]
        tuner.after_step(cost[n] * 16, 16, decode_only=True)


def test_switches_to_the_faster_count_and_back():
    calls: list[int] = []
    tuner = ThreadTuner((1, 2), period=8, trial=2, set_threads=calls.append)
    assert tuner.current == 2 and calls == [2]
    busy = {1: 1.0, 2: 5.0}  # the other core is busy: two threads stall at every barrier
    drive(tuner, busy, 8 + 4, calls)  # 8 steps, then a trial of 2 x 1 thread + 2 x 2 threads
    assert tuner.current == 1 and calls[-1] == 1
    quiet = {1: 1.0, 2: 0.6}  # the machine is idle again
    drive(tuner, quiet, 8 + 4, calls)
    assert tuner.current == 2 and calls[-1] == 2


def test_a_confirmed_choice_doubles_the_period():
    calls: list[int] = []
    tuner = ThreadTuner((1, 2), period=4, trial=1, max_period=8, set_threads=calls.append)
    drive(tuner, {1: 2.0, 2: 1.0}, 4 + 2, calls)  # first trial confirms 2 threads
    switches = len(calls)
    drive(tuner, {1: 2.0, 2: 1.0}, 7, calls)  # next trial only after 8 steps
    assert len(calls) == switches
    drive(tuner, {1: 2.0, 2: 1.0}, 2, calls)
    assert len(calls) == switches + 2  # 2 -> 1 (trial) -> 2


def test_prefill_steps_do_not_count_and_do_not_end_a_trial():
    calls: list[int] = []
    tuner = ThreadTuner((1, 4), period=4, trial=2, set_threads=calls.append)
    drive(tuner, {1: 9.0, 4: 1.0}, 5, calls)  # 4 decode steps, then the trial of 1 thread starts
    assert calls[-1] == 1
    for _ in range(5):
        tuner.before_step()
        tuner.after_step(0.001, 512, decode_only=False)  # a cheap-per-token prefill: ignored
    assert calls[-1] == 1  # still on trial
    drive(tuner, {1: 9.0, 4: 1.0}, 4, calls)
    assert tuner.current == 4


def test_single_candidate_never_switches():
    calls: list[int] = []
    tuner = ThreadTuner((1,), period=2, trial=1, set_threads=calls.append)
    drive(tuner, {1: 1.0}, 10, calls)
    assert calls == [1]
