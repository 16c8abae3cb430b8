"""Direct Preference Optimization: the loss and metrics of a batch of preference pairs.

A collated DPO batch (data/preference.py, `collate(..., pairs=True)`) numbers its documents in
`doc_ids` (-1 on padding): document 2k is the chosen side of pair k, 2k+1 the rejected side. A
side's log-prob is the SUM of its completion tokens' log-probs (labels != -100), as in TRL.

The reference is the base model with the LoRA adapter disabled, run in the same forward under
no_grad (peft's `disable_adapter`): no second copy of the weights. For full fine-tuning it is a
frozen copy of the base taken before training, a `FrozenReference` held outside the policy's module
tree (so DDP, the optimizer and checkpoints never see it) and sharded like the policy by the
strategy (parallel.py: FSDP2 `fully_shard`, a ZeRO-3 engine without optimizer). Rewards are
beta * (policy - reference) log-prob; the loss per pair:
  sigmoid  -(1 - e) logsigmoid(beta m) - e logsigmoid(-beta m),  m = chosen - rejected log-ratio,
           e = dpo.label_smoothing (0: the DPO paper, TRL's `sigmoid`)
  ipo      (m' - 1 / (2 beta))^2, m' = the log-ratios divided by their completion token counts
           (TRL's length-normalized IPO)

The module returns the SUM of the per-pair losses of the valid pairs (a filler row's pairs have no
completion tokens and count for nothing) and the sums behind TRL's metrics, so that the trainer
divides by the pairs of the whole optimizer step on all ranks (the same normalization as SFT's
per-token one: accumulation and data parallelism give the same update as one big batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor

from llama_train.data.chat import IGNORE_INDEX

# Order of the per-step sums a DPO forward returns (see `DPOModule.forward`).
STAT_NAMES = (
    "pairs",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "preference/accuracy",
)


DEFAULT_CHUNK_TOKENS = 1024  # train.loss_chunk_size's default


def _token_logps(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    logits = (hidden @ weight.T).float()
    return logits.gather(1, targets.unsqueeze(1)).squeeze(1) - logits.logsumexp(-1)


def token_logps(hidden: Tensor, weight: Tensor, targets: Tensor, *, chunk_size: int) -> Tensor:
    """log p(target) of each row of `hidden` [N, H] under lm_head `weight` [V, H], as float32 [N].

    At most `chunk_size` rows of [N, V] logits exist at a time: with grad, each chunk is
    recomputed in backward (activation checkpointing) instead of keeping its logits, so an 8B
    vocabulary (128k) over thousands of completion tokens does not hold N x V x 4 bytes."""
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    pieces = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if grad:
            pieces.append(torch.utils.checkpoint.checkpoint(_token_logps, h, weight, t, use_reentrant=False))
        else:
            pieces.append(_token_logps(h, weight, t))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


def completion_logps(
    model,
    input_ids: Tensor,
    labels: Tensor,
    doc_ids: Tensor,
    *,
    num_docs: int,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_TOKENS,
    **model_kwargs,
) -> tuple[Tensor, Tensor]:
    """(sum of completion log-probs, completion tokens) per document, each [num_docs] float32.

    Only the completion positions go through lm_head, `chunk_size` tokens at a time, so no
    [batch, seq, vocab] logits exist."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = base.model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **model_kwargs
    )
    shift_labels = labels[:, 1:]
    keep = shift_labels != IGNORE_INDEX
    hidden = out.last_hidden_state[:, :-1, :][keep]
    targets = shift_labels[keep]
    token_logps_ = token_logps(hidden, base.lm_head.weight, targets, chunk_size=chunk_size)
    docs = doc_ids[:, 1:][keep]
    sums = torch.zeros(num_docs, dtype=torch.float32, device=targets.device).index_add(0, docs, token_logps_)
    counts = torch.zeros(num_docs, dtype=torch.float32, device=targets.device).index_add(
        0, docs, torch.ones_like(token_logps_)
    )
    return sums, counts


def pair_losses(
    policy: Tensor,
    reference: Tensor,
    counts: Tensor,
    *,
    beta: float,
    loss: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair DPO losses and per-pair metric values from per-document log-probs ([2P] each,
    chosen/rejected interleaved)."""
    pc, pr = policy[0::2], policy[1::2]
    rc, rr = reference[0::2], reference[1::2]
    chosen_ratio, rejected_ratio = pc - rc, pr - rr
    margin = chosen_ratio - rejected_ratio
    if loss == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(-beta * margin)
    elif loss == "ipo":
        nc, nr = counts[0::2].clamp(min=1.0), counts[1::2].clamp(min=1.0)
        losses = (chosen_ratio / nc - rejected_ratio / nr - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"dpo.loss {loss!r}: use sigmoid or ipo")
    chosen_rewards, rejected_rewards = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    metrics = {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": pc.detach(),
        "logps/rejected": pr.detach(),
        # the policy's own preference (no reference): what the eval reports before and after training
        "preference/accuracy": (pc.detach() > pr.detach()).float(),
    }
    return losses, metrics


class FrozenReference(torch.nn.Module):
    """The reference of full fine-tuning: a frozen copy of the base model, a module tree of its own
    whose forward is the whole reference pass (per-document completion log-probs, under no_grad).
    Being its own root lets a strategy shard it as it shards the policy: FSDP2 gathers the root's
    parameters (embeddings, final norm, lm_head, read outside lm_head.forward) for this forward,
    ZeRO-3 partitions it as an engine without optimizer."""

    def __init__(self, model, *, chunk_size: int = DEFAULT_CHUNK_TOKENS):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.chunk_size = chunk_size

    def train(self, mode: bool = True):
        return super().train(False)  # always eval: the reference is the base as it was

    @torch.no_grad()
    def forward(self, input_ids, labels, doc_ids, *, num_docs: int, attention_mask=None, position_ids=None):
        return completion_logps(
            self.model,
            input_ids,
            labels,
            doc_ids,
            num_docs=num_docs,
            attention_mask=attention_mask,
            position_ids=position_ids,
            chunk_size=self.chunk_size,
        )


class DPOModule(torch.nn.Module):
    """The model as the training loop sees it under train.objective: dpo:
    forward(input_ids, labels, attention_mask, position_ids, doc_ids) → (loss_sum, stats), stats the
    [len(STAT_NAMES)] sums over the valid pairs (the first is their count)."""

    def __init__(
        self,
        inner,
        *,
        beta: float,
        loss: str,
        label_smoothing: float,
        policy_is_reference: bool = False,
        reference_model=None,
        chunk_size: int = DEFAULT_CHUNK_TOKENS,
    ):
        super().__init__()
        self.inner = inner
        self.chunk_size = chunk_size
        # Not registered submodules: no gradients, no DDP buckets, not in state_dict / checkpoints.
        # `reference_model` is the frozen copy itself, `reference_pass` what runs it (see set_reference_pass).
        if isinstance(reference_model, FrozenReference):
            reference_pass, reference_model = reference_model, reference_model.model
        else:
            reference_pass = (
                None if reference_model is None else FrozenReference(reference_model, chunk_size=chunk_size)
            )
        object.__setattr__(self, "reference_model", reference_model)
        self.set_reference_pass(reference_pass)
        self.beta, self.loss, self.label_smoothing = beta, loss, label_smoothing
        # the gate scores the base model itself as a policy: its policy pass is the reference pass
        self.policy_is_reference = policy_is_reference

    def set_reference_pass(self, reference_pass) -> None:
        """What computes the full fine-tuning reference's log-probs: the `FrozenReference` around
        `reference_model`, or what a strategy made of it (sharded in place, a DeepSpeed engine around
        it), called as `FrozenReference.forward`."""
        object.__setattr__(self, "reference_pass", reference_pass)

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None, doc_ids=None):
        if doc_ids is None:
            raise ValueError("a DPO batch needs doc_ids (collate(..., pairs=True))")
        num_docs = int(doc_ids.max()) + 1
        num_docs += num_docs % 2
        batch = dict(num_docs=num_docs, attention_mask=attention_mask, position_ids=position_ids)
        kwargs = dict(batch, chunk_size=self.chunk_size)
        with torch.no_grad():
            if self.reference_pass is not None:
                reference, counts = self.reference_pass(input_ids, labels, doc_ids, **batch)
            else:
                with self.inner.disable_adapter():
                    reference, counts = completion_logps(self.inner, input_ids, labels, doc_ids, **kwargs)
        if self.policy_is_reference:
            policy = reference
        else:
            policy, counts = completion_logps(self.inner, input_ids, labels, doc_ids, **kwargs)
        losses, metrics = pair_losses(
            policy, reference, counts, beta=self.beta, loss=self.loss, label_smoothing=self.label_smoothing
        )
        valid = ((counts[0::2] > 0) & (counts[1::2] > 0)).float()  # filler pairs: no completion tokens
        loss_sum = (losses * valid).sum()
        stats = torch.stack([valid.sum()] + [(metrics[k] * valid).sum() for k in STAT_NAMES[1:]])
        return loss_sum, stats

    def generate(self, **kwargs):
        return self.inner.generate(**kwargs)


def step_metrics(stats: list[float]) -> dict[str, float]:
    """Means over the pairs of a step (or an eval set) from summed stats, named as TRL names them."""
    pairs = max(stats[0], 1.0)
    return {name: value / pairs for name, value in zip(STAT_NAMES[1:], stats[1:])}


@torch.no_grad()
def eval_preferences(
    model,
    rows: list[dict],
    *,
    pad_id: int,
    batch_size: int,
    device,
    attn_implementation: str = "sdpa",
    mask_dtype: torch.dtype = torch.float32,
) -> dict:
    """Held-out pairs: DPO loss, reward accuracy and margin (relative to the reference) and the
    policy's own preference accuracy (chosen log-prob above rejected). `model` is the (possibly
    wrapped) DPOModule."""
    from llama_train.data.loader import MODEL_INPUTS, collate

    was_training = model.training
    model.eval()
    loss_total, totals = 0.0, None
    for i in range(0, len(rows), batch_size):
        batch = collate(
            rows[i : i + batch_size],
            pad_id=pad_id,
            pairs=True,
            attn_implementation=attn_implementation,
            mask_dtype=mask_dtype,
        )
        loss_sum, stats = model(**{k: v.to(device) for k, v in batch.items() if k in MODEL_INPUTS})
        loss_total += float(loss_sum)
        values = [float(x) for x in stats]
        totals = values if totals is None else [a + b for a, b in zip(totals, values)]
    model.train(was_training)
    totals = totals or [0.0] * len(STAT_NAMES)
    m = step_metrics(totals)
    return {
        "loss": loss_total / max(totals[0], 1.0),
        "preference_accuracy": m["preference/accuracy"],
        "reward_accuracy": m["rewards/accuracies"],
        "reward_margin": m["rewards/margins"],
        "rewards_chosen": m["rewards/chosen"],
        "rewards_rejected": m["rewards/rejected"],
        "num_samples": int(totals[0]),
    }
