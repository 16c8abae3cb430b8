"""Deadline-aware admission (llama_train.serve.admission): the step-time model and the decision."""

from __future__ import annotations

import pytest

from llama_train.serve.admission import Pending, StepTimes, admits


def measured(a: float = 0.02, c: float = 0.01, sizes=(1, 2, 4, 8, 16)) -> StepTimes:
    times = StepTimes()
    for b in sizes:
        times.add_step(b, a + c * b)
    return times


def test_step_time_fit_recovers_a_linear_cost_and_is_pessimistic_from_one_size():
    times = measured()
    assert times.step_seconds(32) == pytest.approx(0.02 + 0.01 * 32)
    assert times.max_rows_seen == 16
    one = StepTimes()
    one.add_step(4, 0.2)
    assert one.step_seconds(8) == pytest.approx(0.4)  # proportional: never optimistic upwards
    assert StepTimes().step_seconds(4) is None
    one.add_prefill(100, 0.5)
    one.add_prefill(100, 1.5)
    assert one.prefill_seconds(10) == pytest.approx(10 * (0.005 + 0.2 * 0.01))


def test_a_burst_is_admitted_only_as_far_as_the_admitted_rows_keep_their_deadlines():
    """16 tokens per request, 3 s to go: at 0.02 + 0.01 b s per step, b rows take 16 (0.02 +
    0.01 b) s, within 3 s for b <= 16. Admission stops at 16 rows."""
    times = measured(sizes=(1, 2, 4, 8, 16, 32))
    now, deadline = 100.0, 103.0
    running: list[Pending] = []
    while admits(times, running, new_rows=1, new_prompt_tokens=0, now=now) and len(running) < 64:
        running.append(Pending(16, deadline))
    assert len(running) == 16
    # the same rows with a generous deadline: all 32 measured sizes admitted (slow start allows 64)
    roomy = [Pending(16, now + 60)] * 40
    assert admits(times, roomy, new_rows=1, new_prompt_tokens=0, now=now)


def test_prefill_delays_count_rows_already_late_do_not_block_and_slow_start_caps_growth():
    times = measured()
    times.add_prefill(1000, 1.0)  # 1 ms per prompt token
    now = 0.0
    tight = [Pending(10, now + 10 * (0.02 + 0.01 * 3) + 0.05)]  # fits 3 rows' pace, 50 ms spare
    tight += [Pending(1, None)]
    assert admits(times, tight, new_rows=1, new_prompt_tokens=10, now=now)  # 10 ms prefill
    assert not admits(times, tight, new_rows=1, new_prompt_tokens=200, now=now)  # 200 ms prefill
    late = [Pending(100, now + 0.5), Pending(1, None)]  # cannot make it even now: not protected
    assert admits(times, late, new_rows=1, new_prompt_tokens=0, now=now)
    fresh = StepTimes()
    fresh.add_step(4, 0.05)
    assert admits(fresh, [Pending(5, None)] * 7, new_rows=1, new_prompt_tokens=0, now=now)  # 8 <= 2 x 4
    assert not admits(fresh, [Pending(5, None)] * 8, new_rows=1, new_prompt_tokens=0, now=now)
    assert admits(StepTimes(), [Pending(5, None)] * 3, new_rows=1, new_prompt_tokens=0, now=now)
    assert not admits(StepTimes(), [Pending(5, None)] * 4, new_rows=1, new_prompt_tokens=0, now=now)
    assert admits(StepTimes(), [], new_rows=8, new_prompt_tokens=10_000, now=now)  # idle: always


def simulate(
    policy,
    *,
    burst: int = 32,
    tokens: int = 16,
    prompt: int = 300,
    deadline: float = 8.0,
    a: float = 0.05,
    c: float = 0.02,
    prefill_s_per_token: float = 0.001,
) -> list[float]:
    """The engine's loop on a cost model (iteration a + c x rows seconds, prefill per prompt token),
    a burst arriving at once, requests dropped at their deadline (the 504): finishing times of the
    requests served in time."""
    times, now = StepTimes(), 0.0
    queue = [{"left": tokens, "deadline": deadline} for _ in range(burst)]
    running: list[dict] = []
    served = []
    while queue or running:
        queue = [q for q in queue if now < q["deadline"]]
        admitted = []
        while queue:
            pending = [Pending(r["left"], r["deadline"]) for r in running + admitted]
            if pending and not policy(
                times,
                pending,
                new_rows=1,
                new_prompt_tokens=prompt,
                now=now,
                admitted_prompt_tokens=prompt * len(admitted),
            ):
                break
            admitted.append(queue.pop(0))
        if admitted:
            dt = prefill_s_per_token * prompt * len(admitted)
            now += dt
            times.add_prefill(prompt * len(admitted), dt)
        running += admitted
        if running:
            dt = a + c * len(running)
            now += dt
            times.add_step(len(running), dt)
            for r in running:
                r["left"] -= 1
            served += [now for r in running if r["left"] == 0 and now <= r["deadline"]]
            running = [r for r in running if r["left"] > 0 and now < r["deadline"]]
        elif not queue:
            break
    return served


def test_admission_serves_part_of_a_burst_that_all_at_once_batching_serves_none_of():
    """32 requests x 16 tokens with 300-token prompts, 8 s to go: all at once, the 32 prefills
    (9.6 s) alone pass the deadline and nobody is served (the defect: 32/32 504). With admission
    the first waves are sized to finish in time."""
    everyone = simulate(lambda *a, **k: True)
    assert everyone == []
    served = simulate(admits)
    assert len(served) >= 8, served
    assert max(served) <= 8.0
