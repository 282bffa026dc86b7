"""A SentencePiece tokenizer.json and a sliding-window model through the real binary: tiny-mistral
(window 4 on every layer, tests/data/models/tiny-mistral) served with the Llama-style Metaspace
tokenizer.json of tests/data/tokenizer/spm_hf/llama_metaspace (written by
tests/golden/gen_spm_hf_golden.py; its 520 pieces cover the model's 320 ids).

- A 120-token greedy completion from token ids gives the text of transformers' tokens
  (tests/data/window/tiny-mistral-long.json) decoded piece by piece ("▁" → space, <0xXX> → byte),
  the same streamed and not, the first token's leading space kept (a completion continues its prompt).
- /metrics: the KV blocks behind the window were freed (deltaserve_kv_blocks_window_freed_total) and
  none are held afterwards (deltaserve_kv_blocks_used). (Holding few blocks in a pool too small for
  the whole sequence is tests/unit/test_kv_window.c.)
"""
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import BINARY, REPO, THREADS, Server, free_port, wait_healthy, wait_idle

MODEL_DIR = REPO / "tests" / "data" / "models" / "tiny-mistral"
TOK_DIR = REPO / "tests" / "data" / "tokenizer" / "spm_hf" / "llama_metaspace"
GOLDEN = REPO / "tests" / "data" / "window" / "tiny-mistral-long.json"


def expected_text(ids):
    """The pieces of ids as the decoder (Replace "▁", ByteFallback, Fuse) makes them, no Strip,
    special tokens skipped (the server's default, skip_special_tokens)."""
    doc = json.loads((TOK_DIR / "tokenizer.json").read_text())
    piece = {i: p for p, i in doc["model"]["vocab"].items()}
    special = {a["id"] for a in doc["added_tokens"] if a["special"]}
    out = b""
    for i in ids:
        if i in special:
            continue
        p = piece[i]
        if len(p) == 6 and p.startswith("<0x") and p.endswith(">"):
            out += bytes([int(p[3:5], 16)])
        else:
            out += p.replace("\u2581", " ").encode()
    return out.decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def spm_server(tmp_path_factory):
    if not BINARY.is_file():
        pytest.skip(f"deltaserve binary not found at {BINARY}")
    if not (MODEL_DIR / "model.safetensors").is_file():
        pytest.skip("no tiny-mistral (tests/golden/gen_models.py)")
    tmp = tmp_path_factory.mktemp("spm")
    model = tmp / "tiny-mistral"
    model.mkdir()
    for f in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(MODEL_DIR / f, model / f)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOK_DIR / f, model / f)
    port = free_port()
    log_path = tmp / "server.log"
    # 1 MiB of KV cache: 128 blocks of 16 tokens for this model; the freeing shows in the counter.
    cmd = [str(BINARY), "serve", "-m", str(model), "--port", str(port), "--threads", THREADS,
           "--kv-cache-mb", "1", "--served-model-name", "tiny"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    srv = Server(proc, port, None, log_path)
    wait_healthy(srv)
    yield srv
    assert srv.stop() == 0, srv.log()[-4000:]


def metric(srv, name):
    _, body = srv.get("/metrics")
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"/metrics has no {name}")


def test_completion_text_and_window(spm_server):
    g = json.loads(GOLDEN.read_text())
    want = expected_text([s["token"] for s in g["steps"]])
    body = {"model": "tiny", "prompt": g["prompt"], "max_tokens": len(g["steps"]), "temperature": 0}
    freed0 = metric(spm_server, "deltaserve_kv_blocks_window_freed_total")
    st, raw = spm_server.post("/v1/completions", body)
    assert st == 200, raw
    r = json.loads(raw)
    assert r["choices"][0]["finish_reason"] == "length"
    assert r["usage"]["completion_tokens"] == len(g["steps"])
    assert r["choices"][0]["text"] == want

    st, raw = spm_server.post("/v1/completions", {**body, "stream": True})
    assert st == 200
    text = ""
    for line in raw.decode().splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            chunk = json.loads(line[6:])
            text += "".join(c.get("text", "") for c in chunk.get("choices", []))
    assert text == want

    wait_idle(spm_server)
    freed = metric(spm_server, "deltaserve_kv_blocks_window_freed_total") - freed0
    # 132 slots in 16-token blocks: 9 blocks each; all but the last one or two are freed
    assert freed >= 2 * 7, freed
    assert metric(spm_server, "deltaserve_kv_blocks_used") == 0
