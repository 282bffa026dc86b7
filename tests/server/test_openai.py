"""The OpenAI API through the official openai client: completions and chat, streaming and not,
with and without adapters. Greedy (temperature 0) wherever two answers are compared."""
import json
import subprocess

import pytest

from conftest import ADAPTER_NAMES, BINARY, MODEL

COUNT = "1, 2, 3, 4, 5,"  # SmolLM2 greedily continues " 6, 7, 8, 9," (3 tokens per number)
GREEDY = {"temperature": 0}


def test_completion_length(client):
    r = client.completions.create(model="smollm2", prompt=COUNT, max_tokens=6, **GREEDY)
    c = r.choices[0]
    assert r.object == "text_completion" and r.model == "smollm2" and r.id.startswith("cmpl-")
    assert c.finish_reason == "length" and c.index == 0
    assert c.text.startswith(" 6, 7")
    assert r.usage.completion_tokens == 6
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + 6


def test_completion_stop_string(client):
    r = client.completions.create(model="smollm2", prompt=COUNT, max_tokens=12, stop=[" 8"], **GREEDY)
    c = r.choices[0]
    assert c.finish_reason == "stop"
    assert c.text == " 6, 7,", c.text  # the stop string itself is cut
    assert 0 < r.usage.completion_tokens < 12


def test_completion_stream_matches(client):
    full = client.completions.create(model="smollm2", prompt=COUNT, max_tokens=8, **GREEDY)
    chunks = list(client.completions.create(model="smollm2", prompt=COUNT, max_tokens=8, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert text == full.choices[0].text
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert len({ch.id for ch in chunks}) == 1 and len({ch.created for ch in chunks}) == 1


def test_completion_stream_without_usage(client):
    chunks = list(client.completions.create(model="smollm2", prompt="Hi", max_tokens=3, stream=True, **GREEDY))
    assert all(ch.choices for ch in chunks) and all(ch.usage is None for ch in chunks)


def test_chat(client):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=8, **GREEDY)
    c = r.choices[0]
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert c.message.role == "assistant" and c.message.content
    assert c.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 10  # the template's tokens count
    s = list(client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=8, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert s[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices) == c.message.content
    assert s[-1].usage.completion_tokens == r.usage.completion_tokens
    assert s[-2].choices[0].finish_reason == c.finish_reason


def test_chat_without_max_tokens_finishes(client):
    # No max_tokens: the rest of the context. The model ends with <|im_end|> on its own.
    r = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Say OK."}],
                                       stop=["\n", "."], **GREEDY)
    assert r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("name", ADAPTER_NAMES[:2])
def test_adapters_change_output(client, name):
    base = client.completions.create(model="smollm2", prompt=COUNT, max_tokens=8, logprobs=1, **GREEDY)
    ad = client.completions.create(model=name, prompt=COUNT, max_tokens=8, logprobs=1, **GREEDY)
    assert ad.model == name and ad.usage.completion_tokens >= 1
    # Random q/v deltas move the logits (the greedy text may well stay the same on this prompt).
    lb, la = base.choices[0].logprobs.token_logprobs, ad.choices[0].logprobs.token_logprobs
    assert max(abs(a - b) for a, b in zip(la, lb)) > 1e-3
    # The other ways of naming the adapter give the same answer.
    sg = client.completions.create(model=f"smollm2:{name}", prompt=COUNT, max_tokens=8, **GREEDY)
    lx = client.completions.create(model="smollm2", prompt=COUNT, max_tokens=8, extra_body={"adapter_id": name},
                                   **GREEDY)
    assert sg.choices[0].text == ad.choices[0].text == lx.choices[0].text


def test_chat_with_adapter_stream(client):
    msgs = [{"role": "user", "content": "Hello"}]
    r = client.chat.completions.create(model=ADAPTER_NAMES[3], messages=msgs, max_tokens=6, **GREEDY)
    s = list(client.chat.completions.create(model=ADAPTER_NAMES[3], messages=msgs, max_tokens=6, stream=True,
                                            **GREEDY))
    assert "".join(ch.choices[0].delta.content or "" for ch in s) == r.choices[0].message.content


def test_base_aliases(client):
    a = client.completions.create(model="base", prompt=COUNT, max_tokens=4, **GREEDY)
    b = client.completions.create(model="smollm2", prompt=COUNT, max_tokens=4, **GREEDY)
    assert a.choices[0].text == b.choices[0].text and a.model == "base"


def test_n_and_batched_prompts(client):
    r = client.completions.create(model="smollm2", prompt=[COUNT, "Count: one, two,"], n=2, max_tokens=4,
                                  **GREEDY)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    one = client.completions.create(model="smollm2", prompt=COUNT, max_tokens=4, **GREEDY).choices[0].text
    two = client.completions.create(model="smollm2", prompt="Count: one, two,", max_tokens=4, **GREEDY).choices[0].text
    # OpenAI's order: prompt-major, then the n choices of each prompt.
    assert [c.text for c in r.choices] == [one, one, two, two]
    assert r.usage.completion_tokens == 16
    single = client.completions.create(model="smollm2", prompt=COUNT, max_tokens=1, **GREEDY)
    assert r.usage.prompt_tokens > single.usage.prompt_tokens  # both prompts, each counted once


def test_chat_n2_sampled(client):
    r = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}], n=2,
                                       max_tokens=4, temperature=1.0, seed=7)
    assert [c.index for c in r.choices] == [0, 1]
    assert 2 <= r.usage.completion_tokens <= 8


def test_completion_logprobs(client):
    r = client.completions.create(model="smollm2", prompt=COUNT, max_tokens=5, logprobs=2, **GREEDY)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    assert all(len(t) == 2 for t in lp.top_logprobs)
    for tok, val, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert val <= 0 and abs(max(top.values()) - val) < 1e-4  # greedy: the sampled token is the best
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_chat_logprobs(client):
    r = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=4, logprobs=True, top_logprobs=3, **GREEDY)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)


def test_echo(client):
    r = client.completions.create(model="smollm2", prompt=COUNT, max_tokens=3, echo=True, **GREEDY)
    assert r.choices[0].text.startswith(COUNT) and len(r.choices[0].text) > len(COUNT)
    s = list(client.completions.create(model="smollm2", prompt=COUNT, max_tokens=3, echo=True, stream=True, **GREEDY))
    assert "".join(ch.choices[0].text for ch in s) == r.choices[0].text


def tokenize(text):
    out = subprocess.run([str(BINARY), "tokenize", "-m", str(MODEL), text], capture_output=True, text=True,
                         check=True)
    return [int(t) for t in out.stdout.split()]


def test_prompt_token_ids(client):
    ids = tokenize(COUNT)
    by_ids = client.completions.create(model="smollm2", prompt=ids, max_tokens=4, **GREEDY)
    by_text = client.completions.create(model="smollm2", prompt=COUNT, max_tokens=4, **GREEDY)
    assert by_ids.usage.prompt_tokens == len(ids) == by_text.usage.prompt_tokens
    assert by_ids.choices[0].text == by_text.choices[0].text
    two = client.completions.create(model="smollm2", prompt=[ids, ids[:3]], max_tokens=2, **GREEDY)
    assert len(two.choices) == 2 and two.usage.prompt_tokens == len(ids) + 3


def test_models_list(client, server):
    models = client.models.list().data
    ids = [m.id for m in models]
    assert ids[0] == "smollm2"
    assert set(ADAPTER_NAMES + server.golden) <= set(ids)
    raw = {m.id: m.model_dump() for m in models}
    assert raw["smollm2"]["parent"] is None and raw["smollm2"]["max_model_len"] > 0
    assert raw["lora0"]["parent"] == "smollm2" and raw["lora0"]["root"] == "lora0"
    assert all(m.object == "model" and m.owned_by for m in models)


def test_errors_through_client(client):
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-adapter", prompt="x", max_tokens=1)
    assert e.value.body["param"] == "model" and "does not exist" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="smollm2", prompt="x", max_tokens=1, temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:  # context overflow
        client.completions.create(model="smollm2", prompt="x", max_tokens=10_000_000)
    assert e.value.status_code == 400
    assert json.dumps(e.value.body)
