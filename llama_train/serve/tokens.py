"""Token ids and token text for the engine: prompts to ids (chat template or plain text), and
each generated token's logprob entry with its own bytes.

Log probabilities (when a request asks for them) are those of the model's own distribution
(log-softmax of the float32 logits, before temperature and top-p; vLLM's default "raw"
logprobs), one entry per generated token in the OpenAI chat shape
`{"token", "logprob", "bytes", "top_logprobs"}`. The stop token that ends a sequence is listed
only where the request says so (`report_stop_token`: /v1/completions, as vLLM does); otherwise
the entries' bytes join to exactly the returned text (up to a stop string's cut).
"""

from __future__ import annotations

import re

PROMPT_LOGPROB_CHUNK = 512  # prompt positions per log-softmax (bounds the float32 copy)


class Tokens:
    """The engine's tokenizer-side methods (mixed into `serve.engine.Engine`). They read the
    engine's `tokenizer`, `_byte_decoder` (`BYTE_DECODER` for a byte-level tokenizer, else None)
    and `_pieces` (token id -> (text, bytes), filled as tokens are seen)."""

    def chat_prompt_ids(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, tools=tools)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def text_prompt_ids(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt)["input_ids"]

    # ------------------------------------------------------------------ logprobs
    def token_piece(self, token_id: int) -> tuple[str, list[int]]:
        """A token's own bytes (a byte-level BPE token may hold part of a UTF-8 character) and
        their text (partial characters as U+FFFD), as OpenAI reports `token` and `bytes`."""
        hit = self._pieces.get(token_id)
        if hit is None:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            table = self._byte_decoder
            if piece is None:  # an id past the tokenizer's vocabulary (padded embedding rows)
                raw = b""
            elif table is not None and all(c in table for c in piece):
                raw = bytes(table[c] for c in piece)
            elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):  # SentencePiece byte fallback
                raw = bytes([int(piece[3:5], 16)])
            else:  # SentencePiece word piece ("\u2581" = space) or an added token
                raw = piece.replace("\u2581", " ").encode()
            hit = self._pieces[token_id] = (raw.decode("utf-8", errors="replace"), list(raw))
        return hit

    def logprob_entry(
        self, token_id: int, logprob: float | None, top: list[tuple[int, float]], as_ids: bool = False
    ) -> dict:
        """OpenAI chat-shaped entry: the token, its logprob, its bytes and the `top` alternatives
        ((token id, logprob) pairs). `as_ids`: token strings are "token_id:N" (vLLM's
        return_tokens_as_token_ids), the bytes stay the token's own."""

        def item(tid: int, lp: float | None) -> dict:
            text, raw = self.token_piece(tid)
            if lp is not None and not lp >= -9999.0:  # -inf and NaN are not JSON (OpenAI: -9999)
                lp = -9999.0
            return {"token": f"token_id:{tid}" if as_ids else text, "logprob": lp, "bytes": raw}

        entry = item(token_id, logprob)
        entry["top_logprobs"] = [item(t, v) for t, v in top]
        return entry

    def logprob_entries(self, logits, token_ids: list[int], tops: list[int], as_ids: list[bool]) -> list[dict]:
        """Entries for row i of `logits` [rows, vocab] choosing token_ids[i], with tops[i]
        alternatives: log-softmax, gather and top-k on the logits' device, one copy to the host."""
        import torch

        lsm = torch.log_softmax(logits.float(), -1)
        chosen = lsm.gather(1, torch.tensor(token_ids, device=lsm.device)[:, None])[:, 0].tolist()
        k = min(max(tops), lsm.shape[-1])
        vals, ids = lsm.topk(k, -1) if k > 0 else (lsm[:, :0], lsm[:, :0].long())
        vals, ids = vals.tolist(), ids.tolist()
        return [
            self.logprob_entry(t, lp, list(zip(ids[i][:top], vals[i][:top])), a)
            for i, (t, lp, top, a) in enumerate(zip(token_ids, chosen, tops, as_ids))
        ]

    def prompt_logprobs(self, logits, prompt_ids: list[int], top: int, as_ids: bool) -> list[dict]:
        """Entries for every prompt token (the first has logprob None) from the prefill logits
        of its positions, [len - 1 (or more), vocab]: row j predicts prompt token j + 1. Done in
        chunks, so no [len, vocab] float32 copy is made at once."""
        out = [self.logprob_entry(prompt_ids[0], None, [], as_ids)]
        for start in range(0, len(prompt_ids) - 1, PROMPT_LOGPROB_CHUNK):
            targets = prompt_ids[start + 1 : start + 1 + PROMPT_LOGPROB_CHUNK]
            out += self.logprob_entries(
                logits[start : start + len(targets)], targets, [top] * len(targets), [as_ids] * len(targets)
            )
        return out


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE writes each byte as one printable character: the printable Latin-1 bytes
    as themselves, the other bytes as code points 256, 257, ... in byte order. Returns the
    inverse map, character -> byte."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    table, shifted = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


BYTE_DECODER = _byte_level_alphabet()


def is_byte_level(tokenizer) -> bool:
    """Whether the (fast) tokenizer decodes with a ByteLevel decoder (Llama 3, GPT-2 style)."""
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    try:
        decoder = json.loads(backend.to_str()).get("decoder")
    except Exception:  # noqa: BLE001  (a backend that cannot serialize: assume not byte-level)
        return False

    def find(node) -> bool:
        if isinstance(node, dict):
            return node.get("type") == "ByteLevel" or any(find(v) for v in node.values())
        if isinstance(node, list):
            return any(find(v) for v in node)
        return False

    return find(decoder)
