"""Loader: disjoint rank shards that cover the data, deterministic shuffling, exact resume."""

from __future__ import annotations

from llama_train.data.loader import StepLoader


def _loaders(n, world, **kw):
    return [StepLoader(n, micro_batch_size=2, grad_accum_steps=2, world_size=world, rank=r, seed=7, **kw)
            for r in range(world)]


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
