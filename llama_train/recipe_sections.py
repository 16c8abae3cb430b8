"""The recipe's sections but `k8s` (which is llama_train.k8s.config): one pydantic model each,
every field with its default and description. llama_train.config assembles them into the Recipe,
checks options that conflict across sections, and loads, overrides and dumps recipes.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

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
