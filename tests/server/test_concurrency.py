"""Continuous batching must not change results: 32 concurrent greedy streams over 8 adapters and
the base get exactly what each request gets when it runs alone."""
import json
import threading

from conftest import ADAPTER_NAMES, wait_idle
from test_http_raw import Reader, connect, request

MODELS = ["smollm2"] + ADAPTER_NAMES  # 9
PROMPTS = ["Once upon a time", "The best way to learn", "def fibonacci(n):", "In 1969, the first"]
N_CLIENTS = 32
MAX_TOKENS = 12


def stream(server, model, prompt, out, i):
    """One streamed greedy completion over a raw socket; out[i] = (text, n_token_chunks, usage)."""
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    try:
        with connect(server, timeout=300) as s:
            s.sendall(request("POST", "/v1/completions", body))
            status, _, raw = Reader(s).response()
        assert status == 200, raw
        events = [e[len("data: "):] for e in raw.decode().split("\n\n") if e.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
        finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1]
        out[i] = (text, finish, chunks[-1]["usage"])
    except Exception as e:  # reported by the main thread
        out[i] = e


def jobs():
    return [(MODELS[i % len(MODELS)], PROMPTS[(i // len(MODELS) + i) % len(PROMPTS)]) for i in range(N_CLIENTS)]


def test_batching_does_not_change_results(server):
    wait_idle(server)
    todo = jobs()
    alone = {}
    for key in dict.fromkeys(todo):  # each distinct (model, prompt) once, by itself
        out = [None]
        stream(server, *key, out, 0)
        assert not isinstance(out[0], Exception), out[0]
        alone[key] = out[0]
    # The adapters matter: not every model says the same thing to the same prompt.
    assert len({alone[k][0] for k in alone if k[1] == PROMPTS[0]}) > 1
    results = [None] * N_CLIENTS
    threads = [threading.Thread(target=stream, args=(server, m, p, results, i)) for i, (m, p) in enumerate(todo)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    errors = [r for r in results if isinstance(r, Exception) or r is None]
    assert not errors, errors[:3]
    mismatches = [(todo[i], alone[todo[i]], results[i]) for i in range(N_CLIENTS) if results[i] != alone[todo[i]]]
    assert not mismatches, "batched != alone:\n" + "\n".join(map(repr, mismatches[:5]))
    for text, finish, usage in results:
        assert usage["completion_tokens"] <= MAX_TOKENS
        assert (finish == "length") == (usage["completion_tokens"] == MAX_TOKENS)
