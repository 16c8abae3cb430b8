"""The serving engine driven directly (a real model and worker thread, no HTTP): chunked prefill
(issue 20 defect 8). A long prompt is prefilled a chunk per engine iteration between decode
steps, so a short request submitted after it is answered before the long one's first token,
and the chunked prefill gives the same greedy tokens as `transformers.generate()`."""

from __future__ import annotations

import asyncio

import pytest

from llama_train.serve.engine import Engine, GenRequest, SamplingParams

pytestmark = pytest.mark.slow

LONG = 900  # prompt tokens (the tiny model's context is 1024)


def long_prompt(vocab: int) -> list[int]:
    return [1] + [(17 * i + 5) % (vocab - 10) + 5 for i in range(LONG - 1)]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    e = Engine(str(tiny_model_dir), served_model_name="tiny", batch_wait_ms=0, prefill_chunk_tokens=64)
    e.start()
    assert e.ready.wait(120) and e.load_error is None
    yield e
    e.stop()


async def collect(gen: GenRequest, order: list, name: str) -> list:
    texts = []
    while True:
        ev = await asyncio.wait_for(gen.events.get(), 120)
        assert ev.error is None, ev.error
        order.append(name)
        texts += [d[1] for d in ev.deltas]
        if any(d[2] for d in ev.deltas):
            return texts


def test_short_request_finishes_while_a_long_prompt_is_prefilled(engine):
    async def main():
        loop = asyncio.get_running_loop()
        long = GenRequest(
            long_prompt(engine.vocab_size),
            SamplingParams(max_tokens=2, temperature=0, ignore_eos=True),
            "tiny",
            None,
            loop,
        )
        short = GenRequest([1, 7, 9], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True), "tiny", None, loop)
        engine.submit(long)
        engine.submit(short)  # the same admission: before the fix, one padded prefill for both
        order: list[str] = []
        await asyncio.gather(collect(long, order, "long"), collect(short, order, "short"))
        return order

    order = asyncio.run(main())
    # 900 tokens in chunks of 64 take 15 iterations; the short request needs 3 decode steps
    assert order.index("long") > max(i for i, n in enumerate(order) if n == "short"), order
    # what admission predicts from (serve.admission): decode iterations and prefill, measured
    times = engine.step_times
    assert times.max_rows_seen >= 1 and times.prefill_s_per_token > 0 and times.step_seconds(1) > 0


def test_chunked_prefill_matches_transformers_generate(engine, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    ids = long_prompt(engine.vocab_size)[:700]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)[
            0, len(ids) :
        ].tolist()

    async def main():
        loop = asyncio.get_running_loop()
        gens = [
            GenRequest(
                ids, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0, n=n), "tiny", None, loop
            )
            for n in (1, 2)
        ]
        for g in gens:
            engine.submit(g)
        out = []
        for g in gens:
            entries: dict[int, list] = {}
            done = 0
            while done < g.params.n:
                ev = await asyncio.wait_for(g.events.get(), 120)
                assert ev.error is None, ev.error
                for idx, _, fin, lps in ev.deltas:
                    entries.setdefault(idx, []).extend(lps)
                    done += fin is not None
            out.append(entries)
        return out

    results = asyncio.run(main())
    want = [engine.token_piece(t)[1] for t in ref]
    for entries in results:
        for choice in entries.values():
            assert [e["bytes"] for e in choice] == want


def test_adapter_switches_that_were_overtaken_or_collide_change_nothing(tiny_model_dir, tiny_adapter_dir):
    """From review: a registry switch whose name was unloaded or replaced while the new version
    downloaded must not bring it back (still_wanted answers no: Superseded, routes unchanged, the
    loaded weights dropped); a canary for a name that is not served is refused; a generated
    internal name never reuses the name of an adapter loaded at start."""
    from llama_train.serve.engine import Superseded

    e = Engine(str(tiny_model_dir), {"x__1": str(tiny_adapter_dir)}, served_model_name="tiny", batch_wait_ms=0)
    e.start()
    try:
        assert e.ready.wait(120) and e.load_error is None
        before = dict(e.routes)
        with pytest.raises(Superseded):
            e.install_adapter("x__1", tiny_adapter_dir, still_wanted=lambda: False).result(60)
        assert e.routes == before and set(e.model.peft_config) == {"x__1"}
        with pytest.raises(ValueError, match="canary needs 'nobody'"):
            e.install_adapter("nobody", tiny_adapter_dir, canary_fraction=0.1).result(60)
        internal = e.install_adapter("x", tiny_adapter_dir).result(60)
        assert internal != "x__1" and e.routes["x"] == internal and e.routes["x__1"] == "x__1"
        from llama_train.serve.engine import AdapterGone

        async def unloaded_in_between():  # the app answers this 404 model_not_found, not 500
            gen = GenRequest([1, 7], SamplingParams(max_tokens=1), "gone", "gone", asyncio.get_running_loop())
            e.submit(gen)
            return (await asyncio.wait_for(gen.events.get(), 30)).error

        assert isinstance(asyncio.run(unloaded_in_between()), AdapterGone)
    finally:
        e.stop()
