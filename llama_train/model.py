"""Load the base model and tokenizer (tiny or real, one code path) and attach LoRA/DoRA/QLoRA."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from llama_train.config import ModelConfig, Recipe
from llama_train.errors import PreflightError, RecipeError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_base_path(recipe: Recipe) -> str:
    """Local directory or hub id of the base model. `tiny`, `gguf` and `catalogue` models are
    built, converted or fetched on first use."""
    m = recipe.model
    if m.source == "hf":
        assert m.path
        return m.path
    if m.source == "gguf":
        from llama_train.models.gguf import converted_dir

        return str(converted_dir(m.path))
    if m.source == "catalogue":
        from llama_train.models.catalogue import pull

        return str(pull(m.path, key="model.path"))
    from llama_train.tiny import build_tiny

    path = Path(m.path or Path(recipe.output_dir) / "base_model").resolve()
    marker = path / "llama_train_tiny.json"
    built_seed = tiny_seed_of(path)
    if built_seed is not None and built_seed != m.tiny_seed:
        # Never rebuild in place: runs, checkpoints and exports in this directory were trained on it.
        raise RecipeError(
            f"model.tiny_seed={m.tiny_seed}, but {path} holds the tiny model built with seed "
            f"{built_seed}; keep model.tiny_seed={built_seed}, or set a new output_dir "
            "(or model.path) for the other base model"
        )
    if not (built_seed is not None and (path / "model.safetensors").exists()):
        if path.exists() and any(path.iterdir()) and not marker.exists():
            raise RecipeError(
                f"model.path {path} exists and is not a tiny model directory; "
                "point model.path elsewhere or use model.source: hf"
            )
        build_tiny(path, seed=m.tiny_seed)
    return str(path)


def tiny_seed_of(path: Path) -> int | None:
    """The seed a tiny model directory was built with (its llama_train_tiny.json), None if none."""
    marker = path / "llama_train_tiny.json"
    if not marker.exists():
        return None
    try:
        return int(json.loads(marker.read_text())["seed"])
    except (OSError, ValueError, KeyError, TypeError):
        raise RecipeError(f"{marker} is unreadable; delete {path} to build the tiny model again") from None


def load_tokenizer(recipe: Recipe, base_path: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(
            base_path, revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code
        )
    except (OSError, ValueError) as exc:  # not a directory, not a valid hub id, or offline without a cache
        raise RecipeError(
            f"cannot load model.path {base_path!r}: {str(exc).splitlines()[0]} (a local model "
            "directory, or a hub id that is in the HF cache or reachable)"
        ) from None
    if recipe.data.chat_template:
        _check_template_syntax(recipe.data.chat_template)
        tok.chat_template = recipe.data.chat_template
    if tok.chat_template is None:
        raise RecipeError(f"tokenizer of {base_path} has no chat template; set data.chat_template")
    if tok.pad_token_id is None:
        # Llama 3 ships without a pad token; any id works since padded labels are -100 and masked.
        tok.pad_token = tok.eos_token
    return tok


def _check_template_syntax(template: str) -> None:
    """Compile data.chat_template as transformers will, so a syntax error names the recipe key
    instead of surfacing mid-tokenization."""
    from jinja2 import TemplateSyntaxError

    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # a private helper: without it, the error shows when the template first runs
        return
    try:
        _compile_jinja_template(template)
    except TemplateSyntaxError as exc:
        raise RecipeError(f"data.chat_template: Jinja syntax error at line {exc.lineno}: {exc.message}") from None


def load_base_model(model: ModelConfig, base_path: str, *, device: torch.device | None = None):
    from transformers import AutoModelForCausalLM

    m = model
    from llama_train import attention

    attn = attention.resolve(m.attn_implementation)
    if attn in attention.NAMES:
        attention.register()  # transformers must know the name before from_pretrained checks it
    kwargs: dict = dict(
        dtype=DTYPES[m.dtype],
        attn_implementation=attn,
        trust_remote_code=m.trust_remote_code,
        revision=m.revision,
        use_safetensors=True,
    )
    if m.quantization == "nf4":
        if not torch.cuda.is_available():
            raise PreflightError(
                "model.quantization: nf4 (QLoRA) needs a CUDA GPU; none is visible. Use model.quantization: none on CPU"
            )
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(base_path, **kwargs)
    except OSError as exc:
        raise RecipeError(f"cannot load model.path {base_path!r}: {exc}") from None
    if device is not None and m.quantization == "none":
        model.to(device)
    return model


def apply_finetuning(model, recipe: Recipe):
    """LoRA/DoRA (peft) when lora.enabled, else full fine-tuning. Seeded for a reproducible init."""
    lc = recipe.lora
    torch.manual_seed(recipe.train.seed)
    if recipe.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if not lc.enabled:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    import peft

    if recipe.model.quantization != "none":
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=recipe.model.gradient_checkpointing
        )
    names = [name for name, _ in model.named_modules()]
    unknown = [m for m in lc.modules_to_save if not any(n == m or n.endswith("." + m) for n in names)]
    if unknown:  # peft would silently train nothing for them
        raise RecipeError(
            f"lora.modules_to_save {unknown}: no module of the model has that name (for Llama: lm_head, embed_tokens)"
        )
    config = peft.LoraConfig(
        r=lc.r,
        lora_alpha=lc.alpha,
        lora_dropout=lc.dropout,
        target_modules=list(lc.target_modules),
        use_dora=lc.use_dora,
        use_rslora=lc.use_rslora,
        modules_to_save=list(lc.modules_to_save) or None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        model = peft.get_peft_model(model, config)
    except ValueError as exc:
        raise RecipeError(f"lora.target_modules {lc.target_modules}: {exc}") from None
    if recipe.model.gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def isolate_inductor_cache() -> None:
    """Give each CPU kernel family its own inductor cache directory (a subdirectory of the default).

    Inductor's cache key leaves the kernel family out (torch 2.13): a kernel generated for avx512
    and reused in a process forced to avx2 (ATEN_CPU_CAPABILITY) computes wrong numbers, avx2
    kernels reused under `default` do not compile, and avx2 kernels reused on the host's own avx512
    abort the process. Any program that once forced a family leaves such kernels in the shared
    default directory, so the host's own family gets a subdirectory too. An explicit
    TORCHINDUCTOR_CACHE_DIR is left as the user set it (inductor itself sets it to the default
    directory once it has been used in this process: that one is replaced)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    given = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if given and os.path.abspath(given) != os.path.abspath(default_cache_dir()):
        return
    family = (os.environ.get("ATEN_CPU_CAPABILITY") or torch.backends.cpu.get_cpu_capability()).lower()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(default_cache_dir(), f"aten_cpu_{family}")


def compile_decoder_layers(model) -> int:
    """Regional compilation: torch.compile each decoder layer on its own module (train.compile).

    All layers share one graph (same code, same shapes), so compile time does not grow with depth.
    The input embeddings' output is made to require grad (as for gradient checkpointing) so that
    layer 0 sees the same kind of input as the others under LoRA. doc_sdpa/doc_varlen run eager:
    their document boundaries are Python ints that change every step and would recompile the
    layer each step. Returns the number of layers compiled."""
    import torch._dynamo
    from transformers import AttentionInterface

    from llama_train import attention

    for attr in ("recompile_limit", "cache_size_limit"):  # renamed across torch versions
        if hasattr(torch._dynamo.config, attr):
            setattr(torch._dynamo.config, attr, max(64, getattr(torch._dynamo.config, attr)))
    isolate_inductor_cache()
    attention.register()
    AttentionInterface.register("doc_sdpa", torch.compiler.disable(attention.doc_sdpa_attention))
    AttentionInterface.register("doc_varlen", torch.compiler.disable(attention.doc_varlen_attention))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = [m for m in base.modules() if type(m).__name__.endswith("DecoderLayer")]
    if not layers:
        raise RecipeError(f"train.compile: no decoder layers found in {type(base).__name__}; set train.compile: false")
    model.enable_input_require_grads()
    for layer in layers:
        layer.compile()
    return len(layers)


def count_params(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total - trainable


class TrainModule(torch.nn.Module):
    """The model as the training loop sees it: forward(input_ids, labels, ...) → (loss_sum, n).

    The loss is computed from the decoder's hidden states with the chunked cross-entropy, so the
    full logits are never materialized. DDP/FSDP wrap this module, so their hooks run on every
    forward; `generate` is registered as an FSDP forward method for the same reason.
    """

    def __init__(self, inner, *, chunk_size: int):
        super().__init__()
        self.inner = inner
        self.chunk_size = chunk_size

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None):
        from llama_train.loss import causal_lm_loss

        loss_sum, n = causal_lm_loss(
            self.inner,
            input_ids,
            labels,
            attention_mask=attention_mask,
            position_ids=position_ids,
            chunk_size=self.chunk_size,
        )
        return loss_sum, torch.tensor(n)

    def generate(self, **kwargs):
        return self.inner.generate(**kwargs)
