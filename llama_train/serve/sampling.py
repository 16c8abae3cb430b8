"""Sampling: a request's parameters and how one row's next token is drawn from its logits.

`SamplingParams` holds what a request asked for (the app builds it from the OpenAI fields and
vLLM's extensions); `sample_token` turns one row's float32 logits into its next token, applying
the logit processing first (`process_logits`: bias, penalties, min_tokens, the grammar's mask)
when the parameters call for it. A row is the batch's per-sequence state (`serve.batch.Row`):
its request, generated ids, random generator, grammar matcher and the processing tensors built
on first use.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    n: int = 1
    ignore_eos: bool = False  # vLLM extension: generate exactly max_tokens (benchmarks)
    logprobs: int | None = None  # None: off; k >= 0: each token's logprob and the k most likely
    # Logit processing, applied in this order (as vLLM): logit_bias; min_tokens (no stop token
    # before); repetition_penalty (prompt and output tokens: positive logits / p, negative x p);
    # frequency and presence penalties (output tokens: -count x f - p); then temperature, top_k,
    # min_p (drop tokens below min_p x the top probability) and top_p.
    top_k: int = 0  # 0 (or -1): off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_tokens: int = 0  # stop tokens are masked and stop strings ignored until then
    allowed_token_ids: list[int] | None = None  # vLLM: sample only from these
    stop_token_ids: list[int] = field(default_factory=list)  # vLLM: stop like EOS (also with ignore_eos)
    include_stop_str_in_output: bool = False  # vLLM: keep the stop string in the text
    report_stop_token: bool = False  # list the stop token's logprob entry (/v1/completions, as vLLM)
    tokens_as_ids: bool = False  # vLLM return_tokens_as_token_ids: entries' token = "token_id:N"
    prompt_logprobs: bool = False  # also the prompt tokens' (completions with echo)
    # llguidance grammar (serve/structured.py): each step only the tokens it allows (after the
    # other logit processing, before temperature); None = unconstrained
    grammar: str | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def processes_logits(self) -> bool:
        return bool(
            self.repetition_penalty != 1.0
            or self.frequency_penalty
            or self.presence_penalty
            or self.logit_bias
            or self.min_tokens
            or self.allowed_token_ids is not None
            or self.grammar is not None
        )


GREEDY_BELOW = 1e-5  # temperatures under this are greedy (as vLLM): dividing by them overflows


class SamplingFailed(ValueError):
    """Sampling one request's row raised (its parameters make the distribution inf / NaN):
    that request fails, the rows of other requests in the batch go on."""


def sample_token(logits, r, eos_ids: set[int]) -> int:
    """Row `r`'s next token from its logits (greedy, or drawn with its generator)."""
    import torch

    p = r.req.params
    row = process_logits(logits, r, eos_ids) if p.processes_logits else logits
    if p.greedy:
        return int(row.argmax())
    row = row / p.temperature
    if 0 < p.top_k < row.shape[-1]:
        row = row.masked_fill(row < row.topk(p.top_k).values[-1], float("-inf"))
    probs = torch.softmax(row, -1)
    if p.min_p > 0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        probs = probs / probs.sum()  # top_p sees the renormalized distribution
    if p.top_p < 1.0:
        sp, si = probs.sort(descending=True)
        keep = sp.cumsum(-1) - sp < p.top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter(0, si[keep], sp[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=r.generator)[0])


def process_logits(row, r, eos_ids: set[int]):
    """Bias, penalties and the grammar's mask on (a copy of) one row's float32 logits."""
    import torch

    p = r.req.params
    vocab = row.shape[-1]
    if r.bias is None:  # dense bias (logit_bias, allowed_token_ids) and the prompt's tokens, once
        r.bias = torch.zeros(vocab, device=row.device)
        if p.allowed_token_ids is not None:
            r.bias.fill_(float("-inf"))
            r.bias[[t for t in p.allowed_token_ids if t < vocab]] = 0.0
        for tid, bias in p.logit_bias.items():
            if tid < vocab:
                r.bias[tid] += bias
        r.seen = torch.zeros(vocab, dtype=torch.bool, device=row.device)
        r.seen[[t for t in r.req.prompt_ids if t < vocab]] = True
    row = row + r.bias
    if len(r.ids) < p.min_tokens:
        stops = set(p.stop_token_ids) | (set() if p.ignore_eos else eos_ids)
        row[[t for t in stops if t < vocab]] = float("-inf")
    if p.repetition_penalty != 1.0:
        seen = r.seen.clone()
        seen[[t for t in r.ids if t < vocab]] = True
        row = torch.where(seen, torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty), row)
    if r.ids and (p.frequency_penalty or p.presence_penalty):
        counts = torch.bincount(torch.tensor(r.ids, device=row.device), minlength=vocab)[:vocab].float()
        row -= counts * p.frequency_penalty + (counts > 0).float() * p.presence_penalty
    if r.matcher is not None:  # only the tokens the grammar allows at this point
        import llguidance.torch as llt

        if r.bitmask is None:
            r.bitmask = llt.allocate_token_bitmask(1, vocab)
        llt.fill_next_token_bitmask(r.matcher, r.bitmask, 0)
        # Not llt.apply_token_bitmask_inplace: on CPU it took ~100 ms per row for a 49k
        # vocabulary; unpacking the bits with torch takes well under a millisecond.
        row = row.masked_fill(~unpack_bitmask(r.bitmask[0], vocab).to(row.device), float("-inf"))
    return row


_BIT_SHIFTS = None


def unpack_bitmask(words, vocab: int):
    """llguidance's packed mask (int32 words, token i = bit i % 32 of word i // 32) -> bool [vocab]."""
    import torch

    global _BIT_SHIFTS
    if _BIT_SHIFTS is None:
        _BIT_SHIFTS = torch.arange(32, dtype=torch.int32)
    return ((words[:, None] >> _BIT_SHIFTS) & 1).reshape(-1)[:vocab].bool()
