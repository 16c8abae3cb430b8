"""The recipe schema: one YAML file drives train, track, export, gate, serve and k8s.

Every field has a description (exported as JSON Schema by `llama-train recipe schema`). Unknown
keys and wrong types are errors naming the full key path and the closest valid key; conflicting
options are errors naming both keys and the fix.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from llama_train.errors import RecipeError
from llama_train.k8s.config import K8sConfig

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BUILTIN_DATA = "builtin:tasks"
BUILTIN_PREFERENCES = "builtin:preferences"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(Section):
    source: Literal["tiny", "hf", "gguf", "catalogue"] = Field(
        "tiny",
        description="`tiny`: build a small random Llama locally (CPU quickstart, tests); "
        "`hf`: load `model.path` (a local directory or a Hugging Face hub id); `gguf`: a local "
        "Llama .gguf file (llama.cpp/Ollama), converted once to safetensors in the llama_train cache; "
        "`catalogue`: a model of `llama-train model list`, fetched on first use.",
    )
    path: str | None = Field(
        None,
        description="Local model directory or hub id (e.g. meta-llama/Llama-3.1-8B-Instruct) for `hf`; "
        "the .gguf file for `gguf`; the catalogue name (e.g. smollm2-135m-instruct) for `catalogue`; "
        "for `tiny`, where the tiny model is written (default `<output_dir>/base_model`).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to pin.")
    tiny_seed: int = Field(0, description="Seed of the tiny model's weights and tokenizer.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype the base weights are loaded in (bfloat16 on GPUs)."
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "doc_sdpa", "doc_varlen"] = Field(
        "auto",
        description="Attention kernel. `auto` (default): `doc_varlen` on CUDA, `doc_sdpa` elsewhere, the "
        "fastest path measured (BENCHMARKS.md). `doc_sdpa`: packed rows attend per document (cost sum "
        "of squared document lengths, not seq_len^2); `doc_varlen`: the same with torch's varlen "
        "flash kernel on CUDA (falls back to doc_sdpa where unusable). Both behave exactly like sdpa "
        "for unpacked batches and generation. flash_attention_2 needs a CUDA GPU and flash-attn.",
    )
    quantization: Literal["none", "nf4"] = Field(
        "none", description="`nf4`: load the frozen base in 4-bit NF4 (QLoRA; needs CUDA + bitsandbytes)."
    )
    trust_remote_code: bool = Field(
        False, description="Run model code shipped with a hub repo. Off unless you trust the repo."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward: less memory, ~30% more compute."
    )


class DataSource(Section):
    path: str = Field(
        BUILTIN_DATA,
        description=f"A local jsonl/json/parquet/csv file, a hub dataset id, or `{BUILTIN_DATA}` "
        "(generated instruction tasks with exact answers).",
    )
    format: Literal["messages", "alpaca", "sharegpt", "completion", "text", "preference"] = Field(
        "messages",
        description="Row layout: `messages` [{role, content}, ...] (OpenAI style, optional system), "
        "`alpaca` {instruction, input?, output}, `sharegpt` {conversations: [{from, value}]}, "
        "`completion` {prompt, completion}, `text` {text} (continued pre-training, every token trained), "
        "`preference` {prompt, chosen, rejected} for train.objective: dpo (each a list of messages, or "
        "each a string).",
    )
    split: str = Field("train", description="Split name for hub datasets.")
    revision: str | None = Field(
        None,
        description="Hub dataset revision (commit, tag or branch). Pin it: the preprocessing cache "
        "keys a hub dataset by (id, split, revision), not by its content.",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Map the format's field names to this source's column names, e.g. "
        "{messages: conversation} reads the `conversation` column as `messages`.",
    )
    weight: float = Field(
        1.0,
        gt=0,
        description="Mixture weight: this source's valid rows are repeated floor(weight) times plus a "
        "seeded random fraction (weight 0.5 = half the rows, 2 = every row twice).",
    )


class EvalDataConfig(Section):
    path: str | None = Field(
        None,
        description="Held-out eval file. Unset: the built-in eval split when training on built-in "
        "data, else `fraction` of the train rows.",
    )
    format: Literal["messages", "alpaca", "sharegpt", "completion", "text", "preference"] | None = Field(
        None, description="Format of the eval file; default: the first source's format."
    )
    columns: dict[str, str] = Field(
        default_factory=dict, description="Column mapping of the eval file (as in data.sources)."
    )
    fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Fraction of the (valid, deduplicated) train rows held out for eval, seeded by train.seed.",
    )
    max_samples: int = Field(96, ge=1, description="Eval rows used for loss and exact match.")
    max_new_tokens: int = Field(24, ge=1, description="Generation budget per eval row (exact match).")


class BuiltinDataConfig(Section):
    num_train: int = Field(3000, ge=1, description="Train rows generated for `builtin:tasks`.")
    num_eval: int = Field(96, ge=1, description="Held-out eval rows generated for `builtin:tasks`.")
    seed: int = Field(0, description="Seed of the generated rows.")
    tasks: list[Literal["reverse", "sort", "add", "date"]] = Field(
        default_factory=lambda: ["reverse", "sort", "add"],
        description="Built-in tasks to mix: `reverse` letters, `sort` digits, `add` numbers (for the tiny "
        "model), `date` (rewrite `July 2, 1999` as `1999-07-02`; for a real pretrained model).",
    )


class DataConfig(Section):
    sources: list[DataSource] = Field(
        default_factory=lambda: [DataSource()], min_length=1, description="Training datasets (a mixture)."
    )
    eval: EvalDataConfig = Field(default_factory=EvalDataConfig, description="Held-out evaluation.")
    builtin: BuiltinDataConfig = Field(default_factory=BuiltinDataConfig, description="Built-in data.")
    seq_len: int = Field(256, ge=8, description="Maximum tokens per training row (packed or not).")
    packing: bool = Field(
        False,
        description="Pack several samples per row by best-fit-decreasing (position ids restart per "
        "document and attention is isolated per document). false = one sample per row, padded.",
    )
    train_on: Literal["assistant", "last_assistant", "all"] = Field(
        "assistant",
        description="Which tokens carry loss: every assistant turn, the last one, or all tokens. "
        "Each trained turn includes its end-of-turn token. Format `text` always trains every token.",
    )
    overlength: Literal["truncate", "drop", "error"] = Field(
        "drop", description="What to do with a sample longer than seq_len (counts are reported)."
    )
    chat_template: str | None = Field(None, description="Jinja chat template overriding the tokenizer's own.")
    dedup: bool = Field(
        True, description="Drop exact duplicate samples (same format and content); counted as `duplicate`."
    )
    max_dropped_fraction: float = Field(
        0.01,
        ge=0,
        le=1,
        description="Fail preflight (and training) when more than this fraction of the rows read is "
        "dropped for any reason (invalid, duplicate, over-length, nothing supervised).",
    )
    min_packing_efficiency: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Fail preflight when non-pad tokens / row slots of the train rows is below this.",
    )
    shuffle: bool = Field(True, description="Shuffle rows each epoch (deterministic by seed and epoch).")
    group_by_length: bool = Field(
        False,
        description="Unpacked rows (packing: false): order each epoch's shuffled rows by length within "
        "windows of 50 global batches, longest first, so micro batches pad little (HF Trainer's "
        "group_by_length). With packing every row is already about seq_len long.",
    )
    cache: bool = Field(True, description="Reuse the preprocessed (tokenized, packed) data saved under cache_dir.")
    cache_dir: str | None = Field(
        None,
        description="Directory of the preprocessing cache, one subdirectory per content hash; "
        "default `<output_dir>/../data_cache`. Put it on a volume shared by the training pods and "
        "fill it with `llama-train preprocess RECIPE`.",
    )
    num_proc: int | None = Field(
        None,
        ge=1,
        description="Tokenizer processes (datasets.map num_proc); default: CPU count, one per 2,000 rows.",
    )


class LoraConfig(Section):
    enabled: bool = Field(True, description="Train a LoRA adapter; false = full fine-tuning.")
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator; usually 2 * r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: list(LLAMA_PROJECTIONS),
        min_length=1,
        description="Module names that get adapters (Llama: q/k/v/o/gate/up/down_proj).",
    )
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA). vLLM/NIM cannot serve it.")
    use_rslora: bool = Field(False, description="Rank-stabilized scaling alpha / sqrt(r).")
    modules_to_save: list[str] = Field(
        default_factory=list, description="Modules trained in full and saved with the adapter."
    )


class TrainConfig(Section):
    objective: Literal["sft", "dpo"] = Field(
        "sft",
        description="`sft`: next-token loss on the supervised tokens; `dpo`: Direct Preference "
        "Optimization on {prompt, chosen, rejected} pairs (data format `preference`, settings in `dpo`).",
    )
    optimizer: Literal["adamw"] = Field("adamw", description="Optimizer (torch AdamW).")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay.")
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field(
        (0.9, 0.999), description="AdamW betas (beta1, beta2), each in [0, 1)."
    )
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    warmup_steps: int | None = Field(None, ge=0, description="Linear warmup, in optimizer steps.")
    warmup_ratio: float | None = Field(None, ge=0, lt=1, description="Warmup as a fraction of steps.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Floor of the decay, as a fraction of lr.")
    micro_batch_size: int = Field(8, ge=1, description="Rows per forward/backward on each rank.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro batches accumulated per optimizer step.")
    global_batch_size: int | None = Field(
        None,
        ge=1,
        description="Samples per optimizer step over all ranks. When set, it must equal "
        "micro_batch_size x grad_accum_steps x world size (checked at launch); unset = that product.",
    )
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps to run (or set `epochs`).")
    epochs: float | None = Field(None, gt=0, description="Passes over the data (or set `max_steps`).")
    seed: int = Field(42, description="Seed for adapter init, dropout and data order.")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Autocast dtype for forward/backward (bf16 on modern GPUs)."
    )
    loss_scale_init: float = Field(
        65536.0,
        gt=0,
        description="fp16 only: initial dynamic loss scale, a power of two. It halves on a "
        "gradient overflow (the step is skipped) and doubles after 2000 steps without one.",
    )
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global grad norm; null = off.")
    eval_every_n_steps: int = Field(
        0,
        ge=0,
        description="Eval loss and perplexity every N steps, on the same eval/* charts as "
        "the full eval before training (step 0) and at the end; 0 = only those two.",
    )
    log_every_n_steps: int = Field(1, ge=1, description="Progress and metric cadence, in steps.")
    loss_chunk_size: int = Field(
        1024, ge=16, description="Tokens per chunk of the chunked cross-entropy (bounds logits memory)."
    )
    max_nonfinite_skips: int = Field(3, ge=1, description="Stop after this many consecutive steps skipped for NaN/Inf.")
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads; null = torch default.")
    compile: bool = Field(
        False,
        description="torch.compile each decoder layer (regional); attention and the loss stay eager. "
        "A GPU speed-up (BENCHMARKS.md); the first steps and new sequence lengths pay the compile time.",
    )


class DPOConfig(Section):
    beta: float = Field(
        0.1,
        gt=0,
        description="DPO temperature: rewards are beta * (policy - reference) log-prob of a "
        "completion; higher beta keeps the policy closer to the reference.",
    )
    loss: Literal["sigmoid", "ipo"] = Field(
        "sigmoid",
        description="`sigmoid`: -log sigmoid(beta * margin) (the DPO paper); `ipo`: "
        "(margin per completion token - 1 / (2 beta))^2 (IPO, length-normalized as TRL does).",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="sigmoid only: the probability that a pair's label is flipped "
        "(conservative DPO): (1-e) * -logsigmoid(beta m) + e * -logsigmoid(-beta m).",
    )
    reference: Literal["auto", "adapter_disabled", "frozen_copy"] = Field(
        "auto",
        description="Where the reference log-probs come from. `adapter_disabled` (auto with LoRA): "
        "the base model with the adapter switched off in the same forward, no second copy of the weights. "
        "`frozen_copy` (auto with lora.enabled: false): a frozen copy of the base model taken before "
        "training, sharded like the policy under fsdp and deepspeed ZeRO-3 (twice the weights' memory).",
    )


class ParallelConfig(Section):
    strategy: Literal["single", "ddp", "fsdp", "deepspeed"] = Field(
        "single", description="single process, DDP, FSDP2 (fully_shard) or DeepSpeed ZeRO."
    )
    zero_stage: Literal[1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage (strategy deepspeed).")
    cpu_offload: bool = Field(False, description="Offload optimizer state (and ZeRO-3/FSDP params) to CPU.")
    backend: Literal["auto", "nccl", "gloo"] = Field(
        "auto", description="Collective backend; auto = nccl with CUDA, else gloo."
    )
    deepspeed_config: str | None = Field(
        None, description="Path to your own DeepSpeed JSON; overrides the fields built from the recipe."
    )
    timeout_s: int = Field(600, ge=10, description="Collective timeout: a dead rank fails the job after this.")


class CheckpointConfig(Section):
    every_n_steps: int = Field(0, ge=0, description="Save every N optimizer steps (0 = only at the end).")
    keep_last_k: int = Field(2, ge=1, description="Complete checkpoints kept; older ones are pruned.")
    resume: str = Field("auto", description="`auto` (newest complete checkpoint, else fresh), `never`, or a path.")
    save_final: bool = Field(True, description="Save a checkpoint after the last step.")


class TrackingConfig(Section):
    enabled: bool = Field(True, description="Log params, metrics and artifacts to MLflow.")
    uri: str | None = Field(
        None,
        description="MLflow tracking URI; else $MLFLOW_TRACKING_URI; else "
        "sqlite:///<output_dir>/../mlruns.db (open it with `llama-train track ui <output_dir>/..`).",
    )
    experiment: str | None = Field(
        None, description="Experiment name; else $MLFLOW_EXPERIMENT_NAME; else `llama-train`."
    )
    run_name: str | None = Field(None, description="MLflow run name; default: the output dir name.")
    registered_model_name: str | None = Field(
        None, description="Register the adapter under this name with alias `candidate`."
    )
    log_system_metrics: bool = Field(True, description="CPU/GPU/memory system metrics in MLflow.")


class ExportConfig(Section):
    targets: list[Literal["vllm", "nim"]] = Field(
        default_factory=lambda: ["vllm", "nim"],
        description="Serving targets whose adapter rules the export must satisfy.",
    )
    adapter_name: str | None = Field(None, description="Served adapter name; default: the run's name.")
    max_lora_rank: int = Field(16, ge=1, description="vLLM --max-lora-rank of the target server.")
    allow_incompatible: bool = Field(False, description="Export even when the target lint fails.")


class GateConfig(Section):
    metric: Literal["exact_match", "contains", "preference_accuracy"] = Field(
        "exact_match",
        description="Task metric. `preference_accuracy` (the share of held-out pairs whose "
        "chosen side has the higher log-prob) is the one for train.objective: dpo, and used there whatever "
        "this says unless set explicitly.",
    )
    min_improvement_over_base: float = Field(
        0.05, description="Candidate metric must beat the base model by at least this (absolute)."
    )
    max_regression_vs_champion: float = Field(
        0.02, ge=0, description="Candidate may trail the current champion by at most this."
    )
    max_new_tokens: int = Field(24, ge=1, description="Generation budget per eval row.")


class Recipe(Section):
    output_dir: str = Field("outputs/run", description="Where checkpoints, adapter and run.json go.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Base model.")
    data: DataConfig = Field(default_factory=DataConfig, description="Datasets and tokenization.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="Adapter (or full fine-tuning).")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimization.")
    dpo: DPOConfig = Field(default_factory=DPOConfig, description="Preference tuning (train.objective: dpo).")
    parallel: ParallelConfig = Field(default_factory=ParallelConfig, description="Distribution.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpoints.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking.")
    export: ExportConfig = Field(default_factory=ExportConfig, description="Export and lint.")
    gate: GateConfig = Field(default_factory=GateConfig, description="Validation gate thresholds.")
    k8s: K8sConfig = Field(default_factory=K8sConfig, description="Kubernetes job rendering.")

    @model_validator(mode="after")
    def _check_conflicts(self) -> Recipe:
        t = self.train
        if t.max_steps is not None and t.epochs is not None:
            raise ValueError("train.max_steps and train.epochs are both set; keep one (e.g. remove train.epochs)")
        if t.max_steps is None and t.epochs is None:
            raise ValueError("set train.max_steps or train.epochs")
        if t.warmup_steps is not None and t.warmup_ratio is not None:
            raise ValueError("train.warmup_steps and train.warmup_ratio are both set; keep one")
        if self.model.source == "hf" and not self.model.path:
            raise ValueError(
                "model.source is `hf` but model.path is empty; set model.path to a local directory or a hub id"
            )
        if self.model.source == "gguf" and not self.model.path:
            raise ValueError("model.source is `gguf` but model.path is empty; set model.path to a .gguf file")
        if self.model.source == "catalogue":
            from llama_train.models.catalogue import CATALOGUE

            if self.model.path not in CATALOGUE:
                raise ValueError(
                    f"model.source is `catalogue` but model.path is {self.model.path!r}; set it "
                    f"to one of: {', '.join(sorted(CATALOGUE))}"
                )
        if self.model.quantization != "none" and not self.lora.enabled:
            raise ValueError(
                "model.quantization (QLoRA) needs lora.enabled: true; a quantized base cannot be fully fine-tuned"
            )
        if t.compile and self.parallel.strategy == "deepspeed":
            raise ValueError(
                "train.compile is not supported with parallel.strategy deepspeed (the engine "
                "wraps the model); use strategy ddp or fsdp, or set train.compile: false"
            )
        if math.log2(t.loss_scale_init) != round(math.log2(t.loss_scale_init)):
            raise ValueError(
                f"train.loss_scale_init must be a power of two (scaling by one is exact in fp16), "
                f"got {t.loss_scale_init}; e.g. 65536"
            )
        if self.data.group_by_length and self.data.packing:
            raise ValueError(
                "data.group_by_length orders unpacked rows by length; with data.packing: true "
                "the rows are already about seq_len long: set one of them to false"
            )
        if self.parallel.strategy == "deepspeed" and self.model.quantization != "none":
            raise ValueError(
                "model.quantization with parallel.strategy deepspeed is not supported; "
                "use strategy ddp or fsdp for QLoRA"
            )
        self._check_objective()
        return self

    def _check_objective(self) -> None:
        d, dpo = self.data, self.dpo
        default = type(dpo)()
        changed = [k for k in type(dpo).model_fields if getattr(dpo, k) != getattr(default, k)]
        if self.train.objective == "sft" and changed:  # (a dumped recipe holds the defaults: those are fine)
            raise ValueError(
                f"dpo.{changed[0]} is set but train.objective is `sft`, which ignores the dpo "
                "section; set train.objective: dpo, or remove the dpo section"
            )
        if self.train.objective == "sft" and self.gate.metric == "preference_accuracy":
            raise ValueError(
                "gate.metric: preference_accuracy needs train.objective: dpo; use exact_match or contains for sft"
            )
        if (
            self.train.objective == "dpo"
            and "metric" in self.gate.model_fields_set
            and self.gate.metric != "preference_accuracy"
        ):
            raise ValueError(
                f"gate.metric is `{self.gate.metric}` but train.objective is `dpo`, which is "
                "gated on held-out pairs: set gate.metric: preference_accuracy (or remove it)"
            )
        if self.train.objective == "sft" and any(s.path == BUILTIN_PREFERENCES for s in d.sources):
            raise ValueError(
                f"data.sources path {BUILTIN_PREFERENCES} holds preference pairs but "
                "train.objective is `sft`; set train.objective: dpo (or use builtin:tasks)"
            )
        prefs = [f"data.sources[{i}]" for i, s in enumerate(d.sources) if s.format == "preference"]
        if self.train.objective == "sft":
            if prefs:
                raise ValueError(
                    f"{prefs[0]}.format is `preference` but train.objective is `sft`; set "
                    "train.objective: dpo to train on preference pairs"
                )
            return
        if any(s.path == BUILTIN_DATA for s in d.sources):
            raise ValueError(
                f"train.objective is `dpo` but data.sources uses {BUILTIN_DATA} (SFT "
                f"conversations); use path: {BUILTIN_PREFERENCES} with format: preference"
            )
        bad = [
            f"data.sources[{i}].format is `{s.format}`"
            for i, s in enumerate(d.sources)
            if s.format != "preference" and s.path != BUILTIN_PREFERENCES
        ]
        if bad:
            raise ValueError(
                f"train.objective is `dpo` but {bad[0]}; DPO trains on {{prompt, chosen, "
                "rejected}} rows: set format: preference"
            )
        if d.eval.format not in (None, "preference"):
            raise ValueError(
                f"train.objective is `dpo` but data.eval.format is `{d.eval.format}`; "
                "set data.eval.format: preference (or leave it unset)"
            )
        if not self.lora.enabled and dpo.reference == "adapter_disabled":
            raise ValueError(
                "dpo.reference: adapter_disabled needs lora.enabled: true; for full fine-tuning "
                "set dpo.reference: frozen_copy (or auto)"
            )
        if self.lora.enabled and dpo.reference == "frozen_copy":
            raise ValueError(
                "dpo.reference: frozen_copy is for full fine-tuning (lora.enabled: false); with LoRA "
                "the base with the adapter disabled is the reference: set dpo.reference: auto"
            )
        if self.lora.enabled and self.lora.modules_to_save:
            raise ValueError(
                "train.objective: dpo with lora.modules_to_save: the reference (adapter disabled) "
                "would still differ in those modules' saved copies; set lora.modules_to_save: []"
            )
        if d.overlength == "truncate":
            raise ValueError(
                "data.overlength: truncate cannot apply to preference pairs (it would cut the "
                "rejected side of a pair); set data.overlength: drop (or error) for train.objective: dpo"
            )
        if d.train_on != "assistant":
            raise ValueError(
                f"data.train_on is `{d.train_on}`; with train.objective: dpo the loss is always on "
                "the completions (chosen and rejected): remove data.train_on"
            )
        if dpo.loss == "ipo" and dpo.label_smoothing:
            raise ValueError(
                "dpo.label_smoothing applies to dpo.loss: sigmoid only; set dpo.label_smoothing: 0 for dpo.loss: ipo"
            )

    def sha256(self) -> str:
        return hashlib.sha256(dump_recipe(self).encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Loading, overrides, errors


def _suggest(model_cls: type[BaseModel], loc: tuple, bad: str) -> str:
    """Closest valid key at `loc` (a path into the recipe) for a misspelt key."""
    cls: Any = model_cls
    for part in loc:
        if isinstance(part, int) or cls is None:
            continue
        field = cls.model_fields.get(part)
        if field is None:
            return ""
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        cls = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
    if cls is None:
        return ""
    match = difflib.get_close_matches(bad, list(cls.model_fields), n=1, cutoff=0.5)
    return (
        f"; did you mean `{'.'.join(map(str, (*[p for p in loc], match[0])))}`?"
        if match
        else (f"; valid keys: {', '.join(cls.model_fields)}")
    )


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid recipe {source}:"]
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "(recipe)"
        if e["type"] == "extra_forbidden":
            hint = (
                " (YAML needs a space after ':' to read `key: value`)"
                if ":" in str(loc[-1])
                else _suggest(Recipe, loc[:-1], str(loc[-1]))
            )
            lines.append(f"  {key}: unknown key{hint}")
        elif e["type"] == "value_error":
            lines.append(f"  {key}: {e['msg'].removeprefix('Value error, ')}")
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {got!r})"
            if e["type"] == "string_type" and isinstance(got, (bool, int, float)):
                got_s += f'; YAML read the value as {type(got).__name__}: quote it, e.g. {key.split(".")[-1]}: "..."'
            lines.append(f"  {key}: {e['msg']}{got_s}")
    return "\n".join(lines)


class _RecipeLoader(yaml.SafeLoader):
    """YAML for recipes: a key given twice in one mapping is an error (plain YAML keeps the last one,
    silently dropping the first), and dates stay strings (no recipe field is a date)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor`: merged keys may be overridden on purpose
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, f"a mapping key must be a plain value, got {type(key).__name__}", key_node.start_mark
                ) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (also at line {seen[key] + 1}); keep one of them",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506  (a SafeLoader subclass)


def _parse_scalar(text: str) -> Any:
    """Override values are YAML scalars/flow collections: `1e-4`, `true`, `[q_proj, v_proj]`."""
    try:
        return _load_yaml(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"override value {text!r} is not valid YAML: {exc}") from None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} must look like `section.key=value` (e.g. train.lr=1e-4)")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise RecipeError(
                f"override {item!r}: the key {key.strip()!r} is not a dotted recipe key (e.g. train.lr=1e-4)"
            )
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"override {key}: `{'.'.join(parts[: i + 1])}` is not a section")
            node = child
        node[parts[-1]] = _parse_scalar(value)
    return data


def _read_yaml(path: Path) -> dict:
    if not path.exists():
        raise RecipeError(f"recipe file not found: {path} (see `llama-train recipe list`)")
    if path.is_dir():
        raise RecipeError(f"recipe path {path} is a directory; give a .yaml file")
    try:
        data = _load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise RecipeError(f"recipe {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"malformed YAML in {path}{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        raise RecipeError(f"recipe {path} is empty; start from one of `llama-train recipe list`")
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must be a YAML mapping of sections, got {type(data).__name__}")
    return data


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe file, apply dotted overrides, validate. Raises RecipeError (exit code 2)."""
    data = apply_overrides(_read_yaml(Path(path)), list(overrides or []))
    return recipe_from_dict(data, source=str(path))


def recipe_from_dict(data: dict, *, source: str = "<dict>") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, source)) from None


def dump_recipe(recipe: Recipe) -> str:
    """Normalized YAML (all defaults filled, stable key order): what is hashed and logged."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, default_flow_style=False)


def recipe_schema() -> dict:
    schema = Recipe.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "llama_train recipe"
    return schema


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def diff_recipes(old: dict, new: dict) -> list[str]:
    """Keys whose values differ between two recipe dicts, as `key: old -> new` lines."""
    a, b = flatten(old), flatten(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
