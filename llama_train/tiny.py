"""A tiny, randomly initialized Llama and a locally trained tokenizer, for CPU runs and tests.

Everything is deterministic for a given seed: the same seed gives byte-identical
`model.safetensors`, `tokenizer.json` and `config.json`. The result is an ordinary Hugging Face
model directory, so it loads through exactly the code path used for real Llama checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

# Llama 3 special tokens (names as in Meta's tokenizer). Ids are assigned first, in this order.
BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
PAD = "<|finetune_right_pad_id|>"
SPECIAL_TOKENS = [BOS, EOS, START_HEADER, END_HEADER, EOT, PAD]

# Llama-3.1-style chat template: every turn is `<|start_header_id|>role<|end_header_id|>\n\n
# content<|eot_id|>`; the generation prompt opens an assistant header. With `tools`, a system turn
# lists them (Llama 3.1's "Environment: ipython" prompt with the system message folded in); an
# assistant tool call is rendered as Llama 3.1's JSON `{"name": ..., "parameters": {...}}` (one call
# per turn, as Llama 3.1) and a `tool` message as an `ipython` turn. Without tools and tool
# messages it renders exactly as the plain Llama 3 template.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if tools %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nEnvironment: ipython\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- (messages[0]['content'] | trim) + '\\n' }}{%- endif %}"
    "{{- 'Given the following functions, please respond with a JSON for a function call with its proper "
    'arguments that best answers the given prompt.\\n\\nRespond in the format {"name": function name, '
    '"parameters": dictionary of argument name and its value}. Do not use variables.\\n\\n\' }}'
    "{%- for t in tools %}{{- (t | tojson) + '\\n\\n' }}{%- endfor %}"
    "{{- '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if tools and loop.first and message['role'] == 'system' %}"
    "{%- elif message['role'] == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] %}"
    "{%- if message['tool_calls'] | length != 1 %}"
    "{{- raise_exception('This model only supports single tool-calls at once!') }}"
    "{%- endif %}"
    "{%- set call = message['tool_calls'][0]['function'] %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n{\"name\": \"' + call['name'] + "
    "'\", \"parameters\": ' + (call['arguments'] | tojson) + '}<|eot_id|>' }}"
    "{%- elif message['role'] == 'tool' or message['role'] == 'ipython' %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + (message['content'] if message['content'] is string "
    "else message['content'] | tojson) | trim + '<|eot_id|>' }}"
    "{%- else %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' "
    "+ (message['content'] | trim) + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

LM_HEAD_STD = 0.15

TINY_DEFAULTS = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=352,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)


def _tokenizer_corpus(seed: int) -> list[str]:
    """Text the tokenizer's BPE merges are learned from: the built-in tasks plus plain English."""
    from llama_train.data.builtin import generate_examples

    corpus = []
    for ex in generate_examples(num_examples=2000, seed=seed):
        corpus.extend(m["content"] for m in ex["messages"])
    corpus += [
        "You are a helpful assistant. Answer with the result only.",
        "The quick brown fox jumps over the lazy dog.",
        "user assistant system",
    ] * 20
    return corpus


def build_tokenizer(*, vocab_size: int = TINY_DEFAULTS["vocab_size"], seed: int = 0):
    """Train a byte-level BPE tokenizer (digits split one by one, as Llama 3 splits numbers)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\d"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOT,  # chat models stop at end of turn
        pad_token=PAD,
        model_max_length=TINY_DEFAULTS["max_position_embeddings"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny(out_dir: str | Path, *, seed: int = 0, **overrides) -> Path:
    """Write a tiny Llama (config.json, model.safetensors, generation_config.json) and its
    tokenizer to `out_dir`. Returns the directory. Same seed and overrides → identical files."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(seed=seed)
    sizes = {**TINY_DEFAULTS, **overrides}
    sizes["vocab_size"] = max(sizes["vocab_size"], len(tokenizer))
    config = LlamaConfig(
        **sizes,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids(EOT),
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    # Seeded init on CPU: the same seed gives bit-identical weights on any machine.
    gen = torch.random.fork_rng(devices=[])
    with gen:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        # With the default std 0.02, a frozen head over a unit-RMS final norm caps logits near 2.6,
        # so even a perfect adapter could not be confident (loss floor ~3.3 nats). Real pretrained
        # heads are well scaled; a wider random head lets an adapter learn the tasks.
        torch.nn.init.normal_(model.lm_head.weight, std=LM_HEAD_STD)
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=[config.eos_token_id, tokenizer.convert_tokens_to_ids(EOS)],
        pad_token_id=config.pad_token_id,
        do_sample=False,
    ).save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "llama_train_tiny.json").write_text(json.dumps({"seed": seed, **sizes}, indent=2) + "\n")
    return out


ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_random_lora(base: str | Path, out_dir: str | Path, *, seed: int = 1, r: int = 8, scale: float = 10.0) -> Path:
    """A rank-`r` LoRA on all projections of `base` with random (non-zero) B matrices scaled by
    `scale`, so greedy outputs visibly differ from the base's (serving tests and benchmarks)."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        peft.LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False, target_modules=ALL_PROJECTIONS),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(scale)
    model.save_pretrained(out_dir)
    return Path(out_dir)
