"""Token bytes for logprobs: each token's own bytes join to the text, also where a byte-level
BPE token holds only part of a UTF-8 character."""

from __future__ import annotations

from llama_train.serve.engine import Engine
from llama_train.serve.tokens import is_byte_level as _is_byte_level


def _engine(tokenizer) -> Engine:
    from llama_train.serve.tokens import BYTE_DECODER as _BYTE_DECODER

    engine = Engine("unused")
    engine.tokenizer = tokenizer
    engine._byte_decoder = _BYTE_DECODER if _is_byte_level(tokenizer) else None
    return engine


def test_byte_level_pieces_join_to_the_utf8_text(tiny_tokenizer):
    assert _is_byte_level(tiny_tokenizer)
    engine = _engine(tiny_tokenizer)
    text = "naïve café — 日本語 12 ok <|eot_id|>"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = [engine.token_piece(i) for i in ids]
    assert b"".join(bytes(raw) for _, raw in pieces) == text.encode()
    # a token that is part of a character shows it as U+FFFD, its bytes stay exact
    partial = [(t, raw) for t, raw in pieces if "\ufffd" in t]
    assert partial and all(bytes(raw).decode("utf-8", "replace") == t for t, raw in partial)


def test_sentencepiece_style_pieces():
    """Metaspace word pieces and <0xNN> byte-fallback tokens (Llama 2 style tokenizers)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "\u2581hi": 1, "\u2581there": 2, "<0xE6>": 3, "<0x97>": 4, "<0xA5>": 5}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    assert not _is_byte_level(tok)
    engine = _engine(tok)
    assert [engine.token_piece(i) for i in (1, 2)] == [(" hi", list(b" hi")), (" there", list(b" there"))]
    assert b"".join(bytes(engine.token_piece(i)[1]) for i in (3, 4, 5)) == "日".encode()
    assert engine.token_piece(999) == ("", [])  # padded embedding rows past the vocabulary
