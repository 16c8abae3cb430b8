"""Compare JSON-schema constrained-decoding libraries on one tokenizer: compile time, time to
compute the next-token mask (per token, walking a valid instance token by token) and which
JSON Schema features compile. The numbers behind the choice in BENCHMARKS.md.

    pip install llguidance xgrammar outlines-core   # xgrammar: also apache-tvm-ffi
    python scripts/compare_grammar_libs.py --tokenizer DIR

A library that is not installed is skipped.
"""

from __future__ import annotations

import argparse
import json
import time

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "temperature": {"type": "integer", "minimum": -50, "maximum": 60},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["city", "temperature", "unit", "tags", "ok"],
    "additionalProperties": False,
}
INSTANCE = {"city": "Paris", "temperature": 21, "unit": "celsius", "tags": ["sunny", "warm"], "ok": True}

FEATURES = {
    "string maxLength": {"type": "string", "maxLength": 5},
    "string pattern": {"type": "string", "pattern": "^[a-z]+-[0-9]{2}$"},
    "format date-time": {"type": "string", "format": "date-time"},
    "integer min/max": {"type": "integer", "minimum": 3, "maximum": 17},
    "number exclusiveMinimum": {"type": "number", "exclusiveMinimum": 0},
    "enum + const": {
        "type": "object",
        "properties": {"a": {"enum": [1, "x"]}, "b": {"const": "k"}},
        "required": ["a", "b"],
    },
    "anyOf": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
    "oneOf": {"oneOf": [{"type": "integer"}, {"type": "boolean"}]},
    "allOf": {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}}, {"required": ["a"]}]},
    "$defs + $ref": {
        "$defs": {"p": {"type": "integer"}},
        "type": "object",
        "properties": {"x": {"$ref": "#/$defs/p"}},
        "required": ["x"],
    },
    "recursive $ref": {
        "$defs": {"n": {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/n"}}}}},
        "$ref": "#/$defs/n",
    },
    "array minItems/maxItems": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
    "additionalProperties schema": {"type": "object", "additionalProperties": {"type": "integer"}},
    "object min/maxProperties": {"type": "object", "minProperties": 1, "maxProperties": 2},
}


def bench_llguidance(tok, ids):
    import llguidance
    import llguidance.hf
    import llguidance.torch

    lltok = llguidance.hf.from_tokenizer(tok)
    t0 = time.perf_counter()
    m = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA)))
    compile_s = time.perf_counter() - t0
    mask = llguidance.torch.allocate_token_bitmask(1, lltok.vocab_size)
    t0 = time.perf_counter()
    for t in ids:
        llguidance.torch.fill_next_token_bitmask(m, mask, 0)
        assert m.consume_token(t), m.get_error()
    per_token = (time.perf_counter() - t0) / len(ids)

    def compiles(schema):
        g = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        is_error, _ = llguidance.LLMatcher.validate_grammar_with_warnings(g, lltok)
        return not is_error

    return compile_s, per_token, compiles


def bench_xgrammar(tok, ids):
    import torch
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tok)
    compiler = xgr.GrammarCompiler(info)
    t0 = time.perf_counter()
    m = xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False))
    compile_s = time.perf_counter() - t0
    mask = xgr.allocate_token_bitmask(1, info.vocab_size)
    t0 = time.perf_counter()
    for t in ids:
        m.fill_next_token_bitmask(mask, 0)
        assert m.accept_token(t)
    per_token = (time.perf_counter() - t0) / len(ids)
    del torch

    def compiles(schema):
        compiler.compile_json_schema(json.dumps(schema))
        return True

    return compile_s, per_token, compiles


def bench_outlines(tok, ids):
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    from llama_train.serve.tokens import BYTE_DECODER

    eos = tok.eos_token_id
    vocab: dict[str, list[int]] = {}
    for tid in range(len(tok)):  # byte-level pieces -> their text (as outlines' own loader does)
        piece = tok.convert_ids_to_tokens(tid)
        if tid == eos or piece in tok.all_special_tokens:
            continue
        raw = bytes(BYTE_DECODER[c] for c in piece) if all(c in BYTE_DECODER for c in piece) else piece.encode()
        vocab.setdefault(raw.decode("utf-8", errors="replace"), []).append(tid)
    v = Vocabulary(eos, vocab)
    t0 = time.perf_counter()
    g = Guide(Index(build_regex_from_schema(json.dumps(SCHEMA), r"[ ]?"), v))
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for t in ids:
        allowed = g.get_tokens()
        assert t in allowed
        g.advance(t)
    per_token = (time.perf_counter() - t0) / len(ids)

    def compiles(schema):
        build_regex_from_schema(json.dumps(schema))
        return True

    return compile_s, per_token, compiles


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", required=True, help="a model directory with a fast tokenizer")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    text = json.dumps(INSTANCE, separators=(", ", ": "))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    print(f"tokenizer {args.tokenizer}: vocabulary {len(tok)}; instance {len(ids)} tokens: {text}")
    for name, fn in (("llguidance", bench_llguidance), ("xgrammar", bench_xgrammar), ("outlines-core", bench_outlines)):
        try:
            compile_s, per_token, compiles = fn(tok, ids)
        except ImportError as exc:
            print(f"{name}: not installed ({exc})")
            continue
        except Exception as exc:  # noqa: BLE001  (a library that cannot run the main schema)
            print(f"{name}: failed on the main schema: {type(exc).__name__}: {exc}")
            continue
        ok = []
        for feat, schema in FEATURES.items():
            try:
                ok.append(feat) if compiles(schema) else None
            except Exception:  # noqa: BLE001
                pass
        missing = sorted(set(FEATURES) - set(ok))
        print(
            f"{name}: compile {compile_s * 1e3:.1f} ms; mask {per_token * 1e6:.0f} us/token; "
            f"features {len(ok)}/{len(FEATURES)}; not compiled: {missing or 'none'}"
        )


if __name__ == "__main__":
    main()
