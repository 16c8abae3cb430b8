"""Constrained vs unconstrained decoding in one batch, on the server's engine (no HTTP).

Two runs of the same batch (`--batch` rows, `--tokens` tokens each):
  plain  every row unconstrained (ignore_eos, exactly --tokens tokens);
  mixed  half the rows unconstrained as above, half constrained by a JSON Schema (llguidance
         token masks) whose every valid output is about --tokens tokens long (an array of
         --tokens / 2 digits), so both halves decode for the same number of steps.
Prints decode tokens/s per kind of row and for the whole batch, and the step time with and
without the constrained rows: how much constraining half a batch costs the other half.

    python scripts/bench_constrained.py                      # the tiny random model (built in a temp dir)
    python scripts/bench_constrained.py --base DIR --batch 16 --tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time


def schema(tokens: int) -> dict:
    n = max(1, tokens // 2)  # "d, " is two tokens on byte-level BPE vocabularies (digit, ", ")
    return {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": n, "maxItems": n}


async def run(engine, *, batch: int, tokens: int, constrained: int, grammar: str | None) -> dict:
    from llama_train.serve.engine import GenRequest, SamplingParams

    loop = asyncio.get_running_loop()
    prompt = engine.chat_prompt_ids([{"role": "user", "content": "List some digits."}])
    gens = []
    for i in range(batch):
        c = i < constrained
        params = SamplingParams(
            max_tokens=tokens + 8 if c else tokens,
            temperature=1.0,
            seed=i,
            ignore_eos=not c,
            grammar=grammar if c else None,
        )
        gens.append((c, GenRequest(list(prompt), params, engine.base_id, None, loop)))
    t0 = time.perf_counter()
    for _, g in gens:
        engine.submit(g)

    async def finish(g):
        while True:
            ev = await g.events.get()
            if ev.error is not None:
                raise ev.error
            if any(fin for _, _, fin, _ in ev.deltas):
                return time.perf_counter()

    ends = await asyncio.gather(*(finish(g) for _, g in gens))
    out = {}
    for kind in (True, False):
        rows = [(g, end) for (c, g), end in zip(gens, ends) if c == kind]
        if rows:
            toks = sum(g.completion_tokens for g, _ in rows)
            wall = max(end for _, end in rows) - t0
            out["constrained" if kind else "unconstrained"] = {
                "rows": len(rows),
                "tokens": toks,
                "tokens_per_s": round(toks / wall, 1),
                "tokens_per_s_per_row": round(toks / wall / len(rows), 1),
            }  # what one request sees
    total = sum(g.completion_tokens for _, g in gens)
    wall = max(ends) - t0
    out["batch"] = {
        "tokens": total,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(total / wall, 1),
        "ms_per_step": round(1000 * wall / max(g.completion_tokens for _, g in gens), 2),
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", help="model directory (default: build the tiny random model)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5, help="runs of each scenario, alternating; the best is kept")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: steadier numbers on a shared machine)"
    )
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)

    from llama_train.serve.engine import Engine

    base = args.base
    if base is None:
        from llama_train.tiny import build_tiny

        base = str(build_tiny(tempfile.mkdtemp() + "/tiny", seed=0))
    engine = Engine(base, served_model_name="bench", max_batch_size=args.batch, batch_wait_ms=50, dtype="float32")
    engine.start()
    if not engine.ready.wait(600):
        raise SystemExit(f"model did not load: {engine.load_error!r}")
    grammar = __import__("llguidance").LLMatcher.grammar_from_json_schema(
        json.dumps({**schema(args.tokens), "x-guidance": {"whitespace_flexible": False}})
    )

    async def scenarios():
        await run(engine, batch=args.batch, tokens=8, constrained=args.batch // 2, grammar=grammar)  # warm-up
        best = {}
        for _ in range(args.repeats):
            for name, k in (("plain", 0), ("mixed", args.batch // 2)):
                r = await run(engine, batch=args.batch, tokens=args.tokens, constrained=k, grammar=grammar)
                if name not in best or r["batch"]["wall_s"] < best[name]["batch"]["wall_s"]:
                    best[name] = r
        return best

    try:
        best = asyncio.run(scenarios())
    finally:
        engine.stop()
    print(json.dumps({"base": base, "batch": args.batch, "tokens": args.tokens, **best}, indent=2))
    p, m = best["plain"], best["mixed"]
    print(
        f"per row: unconstrained {p['unconstrained']['tokens_per_s_per_row']} tokens/s in an unconstrained "
        f"batch, {m['unconstrained']['tokens_per_s_per_row']} tokens/s beside {m['constrained']['rows']} "
        f"constrained rows (those: {m['constrained']['tokens_per_s_per_row']} tokens/s); batch "
        f"{p['batch']['tokens_per_s']} -> {m['batch']['tokens_per_s']} tokens/s; step "
        f"{p['batch']['ms_per_step']} ms -> {m['batch']['ms_per_step']} ms"
    )


if __name__ == "__main__":
    main()
