"""Loader: disjoint rank shards that cover the data, deterministic shuffling, exact resume."""

from __future__ import annotations

import pytest

from llama_train.data.loader import StepLoader, as_filler, collate, is_filler, sample_index


def _loaders(n, world, **kw):
    return [
        StepLoader(n, micro_batch_size=2, grad_accum_steps=2, world_size=world, rank=r, seed=7, **kw)
        for r in range(world)
    ]


def test_rank_shards_are_disjoint_and_cover_each_epoch():
    loaders = _loaders(48, 3)  # global batch 12: 4 steps per epoch
    for epoch in range(2):
        seen = []
        for _ in range(4):
            per_rank = [[i for mb in ld.next_step() for i in mb] for ld in loaders]
            for a in range(3):
                for b in range(a + 1, 3):
                    assert not set(per_rank[a]) & set(per_rank[b])
            seen += [i for shard in per_rank for i in shard]
        assert sorted(seen) == list(range(48))
        assert all(ld.state_dict() == {"epoch": epoch + 1, "position": 0} for ld in loaders)


def test_shuffle_is_deterministic_by_seed_and_epoch():
    a, b = _loaders(40, 1)[0], _loaders(40, 1)[0]
    first = [a.next_step() for _ in range(4)]
    assert first == [b.next_step() for _ in range(4)]
    flat_e0 = [i for s in first for mb in s for i in mb][:16]
    for _ in range(6):
        a.next_step()
    assert a.state.epoch == 1
    flat_e1 = [i for s in [a.next_step() for _ in range(4)] for mb in s for i in mb][:16]
    assert flat_e0 != flat_e1  # a new permutation per epoch
    ordered = StepLoader(8, micro_batch_size=4, grad_accum_steps=1, world_size=1, rank=0, seed=7, shuffle=False)
    assert ordered.next_step() == [[0, 1, 2, 3]]


def test_restored_state_continues_with_the_exact_next_batch():
    n = 30  # not a multiple of the global batch: steps straddle epoch boundaries
    ref = _loaders(n, 2)
    for _ in range(5):
        for ld in ref:
            ld.next_step()
    saved = [ld.state_dict() for ld in ref]
    expected = [[ld.next_step() for _ in range(7)] for ld in ref]
    resumed = _loaders(n, 2)
    for ld, state in zip(resumed, saved):
        ld.load_state_dict(state)
    assert [[ld.next_step() for _ in range(7)] for ld in resumed] == expected


def _flat(step):
    return [i for mb in step for i in mb]


def test_epoch_trains_every_sample_once_and_tops_up_the_last_step_with_fillers():
    n = 10  # global batch 8 (2 ranks x micro 2 x accum 2): 2 steps per epoch, the second has 2 samples
    loaders = _loaders(n, 2)
    assert loaders[0].steps_per_epoch() == 2
    for epoch in range(3):
        real, fillers, sizes = [], [], []
        for _ in range(2):
            steps = [ld.next_step() for ld in loaders]
            assert all(len(s) == 2 and all(len(mb) == 2 for mb in s) for s in steps)  # full shape on every rank
            entries = [i for s in steps for i in _flat(s)]
            real += [i for i in entries if not is_filler(i)]
            fillers += [sample_index(i) for i in entries if is_filler(i)]
            sizes.append(loaders[0].last_step_samples)
        assert sorted(real) == list(range(n)), f"epoch {epoch}: each sample exactly once"
        assert sizes == [8, 2] and len(fillers) == 6 and set(fillers) <= set(range(n))
        assert all(ld.state_dict() == {"epoch": epoch + 1, "position": 0} for ld in loaders)  # no step spans epochs
    # rank 1 holds only fillers in the short step; 1 rank x micro 8 sees the same global batches
    one = StepLoader(n, micro_batch_size=8, grad_accum_steps=1, world_size=1, rank=0, seed=7)
    two = _loaders(n, 2)
    for _ in range(4):
        assert _flat(one.next_step()) == [i for ld in two for i in _flat(ld.next_step())]


def test_fewer_samples_than_one_global_batch():
    ld = StepLoader(3, micro_batch_size=4, grad_accum_steps=1, world_size=1, rank=0, seed=1)
    step = _flat(ld.next_step())
    assert sorted(i for i in step if not is_filler(i)) == [0, 1, 2] and sum(map(is_filler, step)) == 1
    assert ld.state_dict() == {"epoch": 1, "position": 0}


def test_filler_rows_carry_no_labels_and_no_tokens():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]
    batch = collate([rows[0], as_filler(rows[1])], pad_id=0)
    assert batch["num_tokens"] == 3 and (batch["labels"][1] == -100).all()
    assert batch["input_ids"][1, :2].tolist() == [8, 9] and rows[1]["labels"] == [8, 9]  # the data row is untouched


def _lognormal_lengths(n, seed=0):
    import numpy as np

    return np.maximum(np.random.default_rng(seed).lognormal(5.3, 0.7, n).astype(int), 8)


def _pad_efficiency(lengths, steps):
    """Real tokens / padded slots over micro batches padded to their longest row."""
    real = sum(int(lengths[i]) for s in steps for mb in s for i in mb if not is_filler(i))
    slots = sum(max(int(lengths[sample_index(i)]) for i in mb) * len(mb) for s in steps for mb in s)
    return real / slots


def test_group_by_length_sorts_windows_and_puts_the_longest_batch_first():
    import random

    from llama_train.data.packing import group_by_length

    n, group = 1000, 8  # windows of 50 x 8 = 400
    lengths = _lognormal_lengths(n)
    order = list(range(n))
    random.Random(1).shuffle(order)
    lengths[order[700]] = lengths.max() + 1000  # the longest row sits in the second window
    out = group_by_length(order, lengths, group)
    assert sorted(out) == list(range(n))
    assert out[0] == order[700]
    batches = [[int(lengths[i]) for i in out[b : b + group]] for b in range(0, n, group)]
    # the first batch of window 1 moved to the front; the first batch of window 0 took its place
    assert batches[0] == sorted(batches[0], reverse=True) and min(batches[0]) >= max(batches[51])
    assert batches[50] == sorted(batches[50], reverse=True) and min(batches[50]) >= max(batches[1])
    for w in (range(1, 50), range(51, 100), range(100, 125)):
        flat = [x for b in w for x in batches[b]]
        assert flat == sorted(flat, reverse=True)
    assert batches[50] == sorted(sorted(lengths[order[:400]], reverse=True)[:8], reverse=True)


def test_group_by_length_pads_less_and_keeps_the_rank_contract():
    import numpy as np

    n = 1000
    lengths = _lognormal_lengths(n)
    two = _loaders(n, 2, lengths=lengths, group_by_length=True)  # global batch 8
    one = StepLoader(
        n, micro_batch_size=4, grad_accum_steps=2, world_size=1, rank=0, seed=7, lengths=lengths, group_by_length=True
    )
    plain = StepLoader(n, micro_batch_size=2, grad_accum_steps=2, world_size=2, rank=0, seed=7)
    order, rank0_steps, plain_steps = [], [], []
    for _ in range(n // 8):  # one epoch, no fillers
        per_rank = [ld.next_step() for ld in two]
        rank0_steps.append(per_rank[0])
        plain_steps.append(plain.next_step())
        flat = [i for shard in per_rank for mb in shard for i in mb]
        assert flat == [i for mb in one.next_step() for i in mb]  # 2 ranks x 2 = 1 rank x 4
        order += flat
    assert sorted(order) == list(range(n))  # every sample once
    assert lengths[order[0]] == lengths.max()  # the longest first
    grouped, shuffled = _pad_efficiency(lengths, rank0_steps), _pad_efficiency(lengths, plain_steps)
    assert grouped > 0.95 and shuffled < 0.8, (grouped, shuffled)
    nxt = [i for ld in two for mb in ld.next_step() for i in mb]  # a new epoch regroups
    assert nxt != order[:8] and lengths[nxt[0]] == lengths.max()
    a = _loaders(n, 1, lengths=lengths, group_by_length=True)[0]  # resume mid-epoch: same batches
    for _ in range(37):
        a.next_step()
    b = _loaders(n, 1, lengths=lengths, group_by_length=True)[0]
    b.load_state_dict(a.state_dict())
    assert [a.next_step() for _ in range(5)] == [b.next_step() for _ in range(5)]
    assert np.array_equal(lengths, _lognormal_lengths(n))  # not reordered in place


def test_grouped_epoch_finishes_in_its_order_on_another_world_size_or_setting():
    """Resumed mid-epoch on 1 rank (global batch 4 instead of 8), or with grouping switched off,
    the epoch still trains every row once; the new setting applies from the next epoch."""
    n = 1001
    lengths = _lognormal_lengths(n)
    for resumed in ({"world": 1, "group_by_length": True}, {"world": 2, "group_by_length": False}):
        two = _loaders(n, 2, lengths=lengths, group_by_length=True)
        seen = [i for _ in range(60) for ld in two for mb in ld.next_step() for i in mb]
        state = two[0].state_dict()
        assert state["group"] == 8
        rest = _loaders(n, resumed["world"], lengths=lengths, group_by_length=resumed["group_by_length"])
        for ld in rest:
            ld.load_state_dict(state)
        while rest[0].state.epoch == 0:
            seen += [i for ld in rest for mb in ld.next_step() for i in mb]
        assert sorted(i for i in seen if not is_filler(i)) == list(range(n)), resumed
        rest[0].next_step()
        assert rest[0].state.group == (4 * resumed["world"] if resumed["group_by_length"] else 0)
    ungrouped = _loaders(n, 1)[0]  # a grouped epoch cannot be finished without the lengths
    ungrouped.load_state_dict(state)
    with pytest.raises(ValueError, match="lengths"):
        ungrouped.next_step()


def test_grouped_fillers_are_the_shortest_rows():
    n = 1001  # global batch 8: the epoch's last step has 1 real row and 7 fillers
    lengths = _lognormal_lengths(n)
    ld = StepLoader(
        n, micro_batch_size=4, grad_accum_steps=2, world_size=1, rank=0, seed=7, lengths=lengths, group_by_length=True
    )
    for _ in range(125):
        ld.next_step()
    last = [i for mb in ld.next_step() for i in mb]
    fillers = [int(lengths[sample_index(i)]) for i in last if is_filler(i)]
    assert len(fillers) == 7 and max(fillers) <= sorted(lengths)[n // 10]


def test_group_by_length_is_for_unpacked_rows(tmp_path):
    from llama_train.config import recipe_from_dict
    from llama_train.errors import RecipeError
    from tests.conftest import tiny_recipe

    with pytest.raises(RecipeError, match="data.group_by_length"):
        recipe_from_dict(tiny_recipe(tmp_path, data={"packing": True, "group_by_length": True}))
    with pytest.raises(ValueError, match="lengths has 3 entries"):
        StepLoader(4, micro_batch_size=1, grad_accum_steps=1, world_size=1, rank=0, seed=0, lengths=[1, 2, 3])


def test_trainer_groups_unpacked_rows_and_the_report_predicts_its_padding(tmp_path, tiny_dir, monkeypatch):
    """A one-epoch run with group_by_length: its first step holds the longest rows (ledger), and
    the data report's efficiency is the real/padded ratio of the batches the trainer ran."""
    import json

    from transformers import AutoTokenizer

    from llama_train.config import recipe_from_dict
    from llama_train.data.dataset import load_data
    from llama_train.data.loader import row_lengths
    from llama_train.trainer import train
    from tests.conftest import tiny_recipe

    monkeypatch.setenv("LLAMA_TRAIN_LEDGER", "1")
    raw = tiny_recipe(
        tmp_path,
        tiny_dir,
        data={"packing": False, "group_by_length": True, "builtin": {"num_train": 200, "num_eval": 4}},
        train={"max_steps": None, "epochs": 1, "micro_batch_size": 4},
    )
    recipe = recipe_from_dict(raw)
    train(recipe)
    ledger = [json.loads(x) for x in (tmp_path / "run" / "ledger" / "rank0.jsonl").read_text().splitlines()]
    steps = [e["ids"] for e in ledger if e["step"] >= 1]
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    grouped = load_data(recipe, tok)
    lengths = row_lengths(grouped.train)
    by_id = dict(zip(grouped.train["id"], lengths))
    assert len(steps) == len(lengths) // 4 and sorted(i for s in steps for i in s) == sorted(by_id)
    assert sorted(by_id[i] for i in steps[0]) == sorted(lengths)[-4:]  # one window: the 4 longest
    ran = sum(by_id[i] for s in steps for i in s) / sum(4 * max(by_id[i] for i in s) for s in steps)
    assert grouped.report["efficiency"] == pytest.approx(ran, rel=1e-12)
    plain = load_data(recipe_from_dict({**raw, "data": {**raw["data"], "group_by_length": False}}), tok)
    assert plain.report["efficiency_if"]["group_by_length"] == pytest.approx(ran, rel=1e-12)
    assert plain.report["efficiency"] < ran
