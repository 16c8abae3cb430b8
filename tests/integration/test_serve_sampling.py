"""Log probabilities, echo and logit processing on the real server (shared `served` process),
checked against the model run directly with transformers: chat `logprobs`/`top_logprobs`, the
lm-eval-harness style `/v1/completions` request (token-id prompt, `echo`, `logprobs`,
`max_tokens: 1`), and `logit_bias`, penalties, `top_k`, `min_p`, `min_tokens`, each replayed
token by token here."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.integration.conftest import ADAPTER_NAME, BASE_NAME

pytestmark = pytest.mark.slow

MSGS = [{"role": "user", "content": "Reverse the word banana"}]


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """The base model and tokenizer in this process: log-softmax of the next-token logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)

    def logprobs(ids: list[int]):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
        return torch.log_softmax(logits, -1)  # row j: distribution of token j + 1

    logprobs.model = model
    return tok, logprobs


def replay(reference, prompt: list[int], steps: int, process=lambda logits, ids, out: logits):
    """Greedy decoding here, with `process(last_logits, all_ids, output_ids)` applied first."""
    import torch

    _, logprobs = reference
    ids, out = list(prompt), []
    for _ in range(steps):
        with torch.no_grad():
            logits = logprobs.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        nxt = int(process(logits.clone(), ids, out).argmax())
        ids.append(nxt)
        out.append(nxt)
    return out


def test_chat_logprobs_match_the_model(served, reference):
    tok, logprobs = reference
    r = served.client().chat.completions.create(
        model=BASE_NAME, messages=MSGS, temperature=0, max_tokens=10, logprobs=True, top_logprobs=3
    )
    choice = r.choices[0]
    content = choice.logprobs.content
    assert len(content) == r.usage.completion_tokens - (choice.finish_reason == "stop")
    assert b"".join(bytes(e.bytes) for e in content) == choice.message.content.encode()
    # Greedy decoding, replayed here token by token: each reported logprob is the model's.
    text = tok.apply_chat_template(MSGS, add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    for e in content:
        lp = logprobs(ids)[-1]
        nxt = int(lp.argmax())
        assert e.logprob == pytest.approx(float(lp[nxt]), abs=1e-4)
        assert len(e.top_logprobs) == 3
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob, abs=1e-6)
        assert e.top_logprobs[1].logprob == pytest.approx(float(lp.topk(2).values[1]), abs=1e-4)
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token
        ids.append(nxt)
    assert (
        tok.decode(ids[len(tok(text, add_special_tokens=False)["input_ids"]) :], skip_special_tokens=True)
        == choice.message.content
    )


def test_streamed_chat_logprobs_equal_the_whole_response(served):
    c = served.client()
    kw = {
        "model": ADAPTER_NAME,
        "messages": MSGS,
        "temperature": 0,
        "max_tokens": 10,
        "logprobs": True,
        "top_logprobs": 2,
    }
    full = c.chat.completions.create(**kw).choices[0].logprobs.content
    chunks = list(c.chat.completions.create(stream=True, **kw))
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [(e.token, e.bytes) for e in streamed] == [(e.token, e.bytes) for e in full]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in full], abs=1e-5)
    # without logprobs asked, none are computed or sent
    plain = c.chat.completions.create(model=ADAPTER_NAME, messages=MSGS, max_tokens=3)
    assert plain.choices[0].logprobs is None


def test_lm_eval_loglikelihood_requests(served, reference):
    """lm-evaluation-harness `local-completions` loglikelihood, request for request: token-id
    lists (a batch of 2), echo, logprobs 1, max_tokens 1, no ignore_eos; it reads
    `token_logprobs[ctxlen:-1]`, so every response must list len(prompt) + 1 tokens, also when the
    generated token is the stop token."""
    import httpx

    tok, logprobs = reference
    ctx = tok("Question: what is the capital of France? Answer:")["input_ids"]
    cont = tok(" Paris is the capital")["input_ids"]
    other = tok("The quick brown fox")["input_ids"]
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    headers = {"authorization": f"Bearer {served.api_key}"}
    body = {
        "model": BASE_NAME,
        "prompt": [ctx + cont, other],
        "echo": True,
        "logprobs": 1,
        "max_tokens": 1,
        "temperature": 0,
        "seed": 1234,
    }
    for bias in ({}, {str(eot): 100}):  # the second ends on the stop token
        r = httpx.post(
            f"{served.v1}/completions", headers=headers, timeout=60, json={**body, "logit_bias": bias}
        ).json()
        assert [c["index"] for c in r["choices"]] == [0, 1]
        for choice, ids in zip(r["choices"], (ctx + cont, other)):
            lp = choice["logprobs"]
            assert len(lp["tokens"]) == len(ids) + 1
            assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
            ref = logprobs(ids)
            want = [float(ref[j, ids[j + 1]]) for j in range(len(ids) - 1)]
            assert lp["token_logprobs"][1 : len(ids)] == pytest.approx(want, abs=1e-4)
            for j in range(1, len(ids)):  # top-1 plus the prompt's own token, as OpenAI documents
                top = lp["top_logprobs"][j]
                assert lp["tokens"][j] in top and 1 <= len(top) <= 2
                assert max(top.values()) == pytest.approx(float(ref[j - 1].max()), abs=1e-4)
            # the text is the prompt and the completion; offsets point into it
            text = choice["text"]
            assert text.startswith(tok.decode(ids))
            for t, off in zip(lp["tokens"], lp["text_offset"]):
                assert t == "<|eot_id|>" or text[off : off + len(t)] == t
        cont_lp = r["choices"][0]["logprobs"]["token_logprobs"][len(ctx) : -1]  # lm-eval's slice
        assert len(cont_lp) == len(cont)
        assert cont_lp == pytest.approx(
            [float(logprobs(ctx + cont)[j - 1, (ctx + cont)[j]]) for j in range(len(ctx), len(ctx + cont))], abs=1e-4
        )
        if bias:
            last = r["choices"][0]
            assert last["finish_reason"] == "stop" and last["logprobs"]["tokens"][-1] == "<|eot_id|>"
            assert last["text"] == tok.decode(ctx + cont)
            assert last["logprobs"]["text_offset"][-1] == len(last["text"])
    # max_tokens 0 with echo only scores the prompt
    r = served.client().completions.create(model=BASE_NAME, prompt=other, echo=True, logprobs=0, max_tokens=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 0
    assert r.choices[0].text == tok.decode(other) and len(r.choices[0].logprobs.tokens) == len(other)
    with pytest.raises(openai.BadRequestError) as exc:
        served.client().completions.create(model=BASE_NAME, prompt=other, max_tokens=0)
    assert exc.value.body["param"] == "max_tokens"


def test_streamed_completion_echoes_the_prompt_first(served):
    c = served.client()
    kw = {
        "model": BASE_NAME,
        "prompt": "The quick brown",
        "max_tokens": 4,
        "temperature": 0,
        "echo": True,
        "logprobs": 0,
        "extra_body": {"ignore_eos": True},
    }
    full = c.completions.create(**kw).choices[0]
    chunks = [ch.choices[0] for ch in c.completions.create(stream=True, **kw) if ch.choices]
    assert chunks[0].text == "The quick brown"
    assert "".join(ch.text for ch in chunks) == full.text
    tokens = [t for ch in chunks if ch.logprobs for t in ch.logprobs.tokens]
    offsets = [o for ch in chunks if ch.logprobs for o in ch.logprobs.text_offset]
    assert tokens == full.logprobs.tokens and offsets == full.logprobs.text_offset
    assert len(tokens) == len(full.logprobs.token_logprobs) > 4
    plain = c.completions.create(
        model=BASE_NAME, prompt="The quick brown", max_tokens=2, echo=True, temperature=0
    ).choices[0]
    assert plain.text.startswith("The quick brown") and plain.logprobs is None


def test_sampled_tokens_report_their_own_logprob(served, reference):
    """Sampled (not greedy) tokens, n=2, with vLLM's return_tokens_as_token_ids: each reported
    logprob is the model's for that very token after that very prefix."""
    tok, logprobs = reference
    kw = {
        "model": BASE_NAME,
        "messages": MSGS,
        "max_tokens": 6,
        "temperature": 1.0,
        "seed": 3,
        "n": 2,
        "logprobs": True,
        "top_logprobs": 2,
        "extra_body": {"ignore_eos": True, "return_tokens_as_token_ids": True},
    }
    r = served.client().chat.completions.create(**kw)
    prompt = tok(tok.apply_chat_template(MSGS, add_generation_prompt=True, tokenize=False), add_special_tokens=False)[
        "input_ids"
    ]
    choices = []
    for ch in r.choices:
        ids = [int(e.token.removeprefix("token_id:")) for e in ch.logprobs.content]
        assert len(ids) == 6
        ref = logprobs(prompt + ids)
        want = [float(ref[len(prompt) - 1 + j, t]) for j, t in enumerate(ids)]
        assert [e.logprob for e in ch.logprobs.content] == pytest.approx(want, abs=1e-4)
        assert all(
            len(e.top_logprobs) == 2 and e.top_logprobs[0].token.startswith("token_id:") for e in ch.logprobs.content
        )
        joined = b"".join(bytes(e.bytes) for e in ch.logprobs.content)
        assert joined.decode("utf-8", "replace") == ch.message.content  # random bytes: not all UTF-8
        choices.append(ids)
    assert choices[0] != choices[1]  # two samples, not one reported twice


def test_bad_logprob_parameters_are_400(served):
    c = served.client()
    with pytest.raises(openai.BadRequestError) as exc:
        c.chat.completions.create(model=BASE_NAME, messages=MSGS, top_logprobs=2, max_tokens=2)
    assert exc.value.body["param"] == "top_logprobs" and "logprobs: true" in exc.value.body["message"]
    with pytest.raises(openai.BadRequestError) as exc:
        c.chat.completions.create(model=BASE_NAME, messages=MSGS, logprobs=True, top_logprobs=21)
    assert exc.value.body["param"] == "top_logprobs"
    headers = {"authorization": f"Bearer {served.api_key}"}
    r = httpx.post(
        f"{served.v1}/completions",
        headers=headers,
        timeout=30,
        content=json.dumps({"model": BASE_NAME, "prompt": "x", "logprobs": 21}),
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"


PROMPT = "The quick brown fox"
WORDY = "Question: what is"  # the tiny model's greedy text from here is visible (" are l are...")


def complete(served, **kw) -> tuple[str, object]:
    kw = {
        "model": BASE_NAME,
        "prompt": PROMPT,
        "max_tokens": 8,
        "temperature": 0,
        "extra_body": {"ignore_eos": True, **kw.pop("extra_body", {})},
        **kw,
    }
    choice = served.client().completions.create(**kw).choices[0]
    return choice.text, choice


def test_logit_bias_forces_and_bans_tokens(served, reference):
    import torch

    tok, _ = reference
    prompt = tok(PROMPT)["input_ids"]
    greedy = replay(reference, prompt, 8)
    forced = tok.convert_tokens_to_ids("Ġthe")
    text, _ = complete(served, logit_bias={str(forced): 100})
    assert text == tok.decode([forced] * 8)
    banned = replay(reference, prompt, 8, lambda x, ids, out: x.index_fill(0, torch.tensor([greedy[0]]), -1e9))
    text, _ = complete(served, logit_bias={str(greedy[0]): -100})
    assert banned[0] != greedy[0] and text == tok.decode(banned)


def test_frequency_presence_and_repetition_penalties_match_the_formulas(served, reference):
    import torch

    tok, _ = reference
    prompt = tok(PROMPT)["input_ids"]
    plain = replay(reference, prompt, 8)

    def penalties(frequency: float, presence: float):
        def process(x, ids, out):
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=x.shape[0]).float()
            return x - frequency * counts - presence * (counts > 0).float()

        return process

    def repetition(x, ids, out):
        seen = torch.tensor(sorted(set(ids)))
        x[seen] = torch.where(x[seen] > 0, x[seen] / 1.8, x[seen] * 1.8)
        return x

    for frequency, presence in ((1.5, 0.0), (0.0, 2.0), (0.7, 0.7)):
        want = replay(reference, prompt, 8, penalties(frequency, presence))
        text, _ = complete(served, frequency_penalty=frequency, presence_penalty=presence)
        assert text == tok.decode(want) and want != plain, (frequency, presence)
    want = replay(reference, prompt, 8, repetition)
    text, _ = complete(served, extra_body={"repetition_penalty": 1.8})
    assert text == tok.decode(want) and want != plain


def test_top_k_1_and_min_p_1_sample_the_greedy_sequence(served):
    greedy, _ = complete(served)
    for seed in (1, 2):
        assert complete(served, temperature=1.5, seed=seed, extra_body={"top_k": 1})[0] == greedy
        assert complete(served, temperature=1.5, seed=seed, extra_body={"min_p": 1.0})[0] == greedy
    sampled = {complete(served, temperature=1.5, seed=s, extra_body={"top_k": 50})[0] for s in (1, 2, 3)}
    assert len(sampled) > 1  # top_k alone still samples


def test_stop_tokens_min_tokens_and_stop_strings(served, reference):
    tok, _ = reference
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    kw = {"model": BASE_NAME, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logit_bias": {str(eot): 100}}
    early = served.client().completions.create(**kw)
    assert early.choices[0].finish_reason == "stop" and early.choices[0].text == ""
    late = served.client().completions.create(**kw, extra_body={"min_tokens": 3})
    assert late.choices[0].finish_reason == "stop" and late.usage.completion_tokens == 4
    # stop_token_ids: a token of the greedy sequence ends it there (it is not in the text)
    greedy = replay(reference, tok(WORDY)["input_ids"], 8)
    k = next(j for j in range(2, 8) if greedy[j] not in greedy[:j])
    text, choice = complete(served, prompt=WORDY, extra_body={"stop_token_ids": [greedy[k]]})
    assert choice.finish_reason == "stop" and text == tok.decode(greedy[:k]) and text.strip()
    # stop strings: cut before them, or kept with include_stop_str_in_output; not before min_tokens
    full = tok.decode(greedy)
    stop = next(full[i : i + 2] for i in range(2, len(full) - 2) if "\ufffd" not in full[i : i + 2])
    text, choice = complete(served, prompt=WORDY, stop=[stop])
    assert choice.finish_reason == "stop" and text == full[: full.find(stop)]
    text, _ = complete(served, prompt=WORDY, stop=[stop], extra_body={"include_stop_str_in_output": True})
    assert text == full[: full.find(stop) + len(stop)]
    r = served.client().completions.create(
        model=BASE_NAME,
        prompt=WORDY,
        max_tokens=8,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True, "min_tokens": 8},
    )
    assert r.usage.completion_tokens == 8 and r.choices[0].finish_reason == "length"
    assert r.choices[0].text == full


def test_allowed_token_ids_restrict_sampling(served, reference):
    tok, _ = reference
    allowed = tok("the and of")["input_ids"][:3]
    r = served.client().completions.create(
        model=BASE_NAME,
        prompt=PROMPT,
        max_tokens=8,
        temperature=1.0,
        seed=0,
        logprobs=0,
        extra_body={"ignore_eos": True, "allowed_token_ids": allowed, "return_tokens_as_token_ids": True},
    )
    ids = [int(t.removeprefix("token_id:")) for t in r.choices[0].logprobs.tokens]
    assert len(ids) == 8 and set(ids) <= set(allowed)


def test_parameters_that_would_be_ignored_are_400(served):
    c = served.client()
    for kw, param in (
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 300}}, "logit_bias"),
        ({"logit_bias": {"999999": 1}}, "logit_bias"),
        ({"extra_body": {"min_tokens": 9}, "max_tokens": 4}, "min_tokens"),
        ({"extra_body": {"guided_json": {"type": "object"}}}, "guided_json"),
        ({"extra_body": {"stop_token_ids": [10**6]}}, "stop_token_ids"),
        ({"extra_body": {"bad_words": ["x"]}}, "bad_words"),
    ):
        with pytest.raises(openai.BadRequestError) as exc:
            c.chat.completions.create(model=BASE_NAME, messages=MSGS, **{"max_tokens": 2, **kw})
        assert exc.value.body["param"].startswith(param), (kw, exc.value.body)
    ok = c.chat.completions.create(model=BASE_NAME, messages=MSGS, max_tokens=2, response_format={"type": "text"})
    assert ok.choices[0].message.content is not None
