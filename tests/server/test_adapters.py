"""Runtime adapters: vLLM's load/unload endpoints, the REST view, every PEFT type, and hot swaps
while requests run on the adapter being swapped."""
import json
import shutil
import threading
import time
from pathlib import Path

import pytest

from conftest import wait_idle
from peft_gen import KINDS

PROMPT = "Once upon a time"


def complete(server, model, max_tokens=8, prompt=PROMPT, **kw):
    status, body = server.post("/v1/completions", {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                   "temperature": 0, **kw})
    return status, json.loads(body)


def load(server, name, path, inplace=None):
    body = {"lora_name": name, "lora_path": path}
    if inplace is not None:
        body["load_inplace"] = inplace
    status, raw = server.post("/v1/load_lora_adapter", body)
    return status, raw.decode()


def unload(server, name):
    status, raw = server.post("/v1/unload_lora_adapter", {"lora_name": name})
    return status, raw.decode()


def adapter(server, name):
    status, raw = server.get(f"/v1/adapters/{name}")
    return status, json.loads(raw)


def test_vllm_load_unload(server):
    status, text = load(server, "va", "lora5")
    assert status == 200 and text == "Success: LoRA adapter 'va' added successfully."
    status, _ = load(server, "va", "lora5")
    assert status == 400  # already loaded (vLLM)
    status, body = complete(server, "va", 2)
    assert status == 200 and body["usage"]["completion_tokens"] == 2
    status, text = load(server, "va", "lora6", inplace=True)
    assert status == 200
    assert adapter(server, "va")[1]["version"] == 2
    status, text = unload(server, "va")
    assert status == 200 and "removed" in text
    assert unload(server, "va")[0] == 404
    assert complete(server, "va", 1)[0] == 404


@pytest.mark.parametrize("path,status", [
    ("no-such-dir", 404),
    ("../../etc", 403),
    ("/etc", 403),
    ("kinds", 400),          # a directory that is not an adapter
])
def test_load_errors(server, path, status):
    got, text = load(server, "bad", path)
    assert got == status, text
    err = json.loads(text)["error"]
    assert err["param"] == "lora_path" and str(server.adapter_dir) not in err["message"]
    assert adapter(server, "bad")[0] == 404


def test_load_base_name_refused(server):
    assert load(server, "smollm2", "lora0")[0] == 400
    assert load(server, "", "lora0")[0] == 400


def test_rest_adapters(server):
    status, raw = server.post("/v1/adapters", {"id": "rest1", "path": "lora4"})
    assert status == 201
    obj = json.loads(raw)
    assert obj["id"] == "rest1" and obj["version"] == 1 and obj["peft_type"] == "LORA"
    assert obj["path"] == "lora4" and obj["bytes"] > 0 and obj["created"] > 0 and "refs" in obj
    assert server.post("/v1/adapters", {"id": "rest1", "path": "lora4"})[0] == 409
    status, raw = server.post("/v1/adapters", {"id": "rest1", "path": "lora5", "replace": True})
    assert status == 200 and json.loads(raw)["version"] == 2 and json.loads(raw)["path"] == "lora5"
    status, raw = server.get("/v1/adapters")
    listed = {a["id"]: a for a in json.loads(raw)["data"]}
    assert listed["rest1"]["version"] == 2 and "lora0" in listed
    status, raw = server.post("/v1/adapters/rest1", None, method="DELETE")
    assert status == 200 and json.loads(raw)["deleted"] is True
    assert adapter(server, "rest1")[0] == 404
    assert server.post("/v1/adapters/rest1", None, method="DELETE")[0] == 404
    assert server.post("/v1/adapters", {"id": "rest2"})[0] == 400


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_peft_type(server, kind):
    name = f"kind-{kind}"
    status, text = load(server, name, f"kinds/{kind}")
    assert status == 200, text
    status, info = adapter(server, name)
    assert status == 200 and info["peft_type"] == {"dora": "LORA", "adalora": "ADALORA", "ia3": "IA3",
                                                   "prompt-tuning": "PROMPT_TUNING", "p-tuning": "P_TUNING",
                                                   "prefix": "PREFIX_TUNING"}[kind]
    status, base = complete(server, "smollm2", 6, logprobs=1)
    status, ad = complete(server, name, 6, logprobs=1)
    assert status == 200, ad
    assert ad["usage"]["completion_tokens"] == 6
    assert ad["usage"]["prompt_tokens"] == base["usage"]["prompt_tokens"]  # virtual tokens are not prompt tokens
    lb = base["choices"][0]["logprobs"]["token_logprobs"]
    la = ad["choices"][0]["logprobs"]["token_logprobs"]
    assert max(abs(a - b) for a, b in zip(la, lb)) > 1e-3, "the adapter changed nothing"
    status, raw = server.post("/v1/chat/completions", {"model": name, "messages": [{"role": "user", "content": "Hi"}],
                                                       "max_tokens": 3, "stream": True})
    assert status == 200 and raw.endswith(b"data: [DONE]\n\n")
    assert unload(server, name)[0] == 200


def test_virtual_tokens_fit_the_context(fresh_server):
    """Chat without max_tokens gets the rest of the context, minus a prompt/prefix adapter's virtual
    tokens (a small --max-model-len makes an off-by-n an error)."""
    srv = fresh_server(["--max-model-len", "48"])
    for kind in ("prompt-tuning", "prefix"):
        assert load(srv, kind, f"kinds/{kind}")[0] == 200
        status, raw = srv.post("/v1/chat/completions", {"model": kind, "messages": [{"role": "user", "content": "Hi"}],
                                                        "temperature": 0, "ignore_eos": True})
        assert status == 200, raw
        usage = json.loads(raw)["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] + 4 == 48
    assert srv.stop() == 0


class Stream(threading.Thread):
    """A greedy streamed completion; `started` is set once its first token arrived."""

    def __init__(self, server, model, max_tokens):
        super().__init__()
        self.server, self.model, self.max_tokens = server, model, max_tokens
        self.started, self.result, self.error = threading.Event(), None, None
        self.events, self.errors = [], []

    def run(self):
        from test_http_raw import connect, request
        body = {"model": self.model, "prompt": PROMPT, "max_tokens": self.max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        try:
            with connect(self.server, timeout=120) as s:
                s.sendall(request("POST", "/v1/completions", body))
                buf = b""
                while not buf.endswith(b"0\r\n\r\n"):
                    data = s.recv(65536)
                    if not data:
                        break
                    buf += data
                    if b'"text":"' in buf:
                        self.started.set()
            assert buf.startswith(b"HTTP/1.1 200"), buf[:200]
            events = [e[6:] for e in buf.decode().split("\n") if e.startswith("data: ")]
            self.events = events
            assert events[-1] == "[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            self.errors = [c["error"] for c in chunks if "error" in c]
            chunks = [c for c in chunks if "error" not in c]
            self.result = ("".join(c["choices"][0]["text"] for c in chunks if c["choices"]),
                           [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1],
                           chunks[-1]["usage"]["completion_tokens"] if chunks[-1].get("usage") else None)
        except Exception as e:
            self.error = e
        finally:
            self.started.set()


def reference(server, path, max_tokens):
    """What the adapter at `path` says alone (loaded under a throwaway name)."""
    assert load(server, "ref", path)[0] == 200
    try:
        status, body = complete(server, "ref", max_tokens, ignore_eos=True)
        assert status == 200
        return body["choices"][0]["text"]
    finally:
        unload(server, "ref")


def test_hot_swap_under_load(server):
    wait_idle(server)
    n = 24
    ref0, ref1, ref2, ref3 = (reference(server, f"lora{i}", n) for i in range(4))
    assert len({ref0, ref1, ref2, ref3}) > 1
    # 1. Unload while three streams run on it: they finish on the version they hold.
    assert load(server, "hs", "lora0")[0] == 200
    streams = [Stream(server, "hs", n) for _ in range(3)]
    for s in streams:
        s.start()
    for s in streams:
        assert s.started.wait(60)
    assert unload(server, "hs")[0] == 200
    assert complete(server, "hs", 1)[0] == 404  # new requests: gone
    for s in streams:
        s.join(120)
        assert s.error is None, s.error
        assert s.result == (ref0, "length", n)
    # 2. Load it again (another adapter's weights): new requests see it.
    assert load(server, "hs", "lora1")[0] == 200
    assert adapter(server, "hs")[1]["version"] == 1
    assert complete(server, "hs", n, ignore_eos=True)[1]["choices"][0]["text"] == ref1
    # 3. Replace in place while a stream runs: the stream keeps v1, new requests get v2.
    assert load(server, "swap", "lora2")[0] == 200
    s = Stream(server, "swap", n)
    s.start()
    assert s.started.wait(60)
    assert load(server, "swap", "lora3", inplace=True)[0] == 200
    assert adapter(server, "swap")[1]["version"] == 2
    status, body = complete(server, "swap", n, ignore_eos=True)
    assert status == 200 and body["choices"][0]["text"] == ref3
    s.join(120)
    assert s.error is None and s.result == (ref2, "length", n)
    for name in ("hs", "swap"):
        assert unload(server, name)[0] == 200


AH_GOLDEN = Path(__file__).resolve().parents[2] / "tests" / "data" / "adapters" / "bottleneck" / "smollm2"


@pytest.mark.skipif(not (AH_GOLDEN / "bn-mam").is_dir(), reason="no tests/data/adapters/bottleneck/smollm2/bn-mam")
def test_adapterhub_mam_and_refused_unions(server):
    """A MAM adapter (AdapterHub prefix tuning + scaled parallel adapter) loads at run time and serves;
    unions deltaserve does not apply are refused by name with 400."""
    dst = Path(server.adapter_dir) / "ah"
    shutil.copytree(AH_GOLDEN / "bn-mam", dst / "mam", dirs_exist_ok=True)
    status, text = load(server, "ah-mam", "ah/mam")
    assert status == 200, text
    status, info = adapter(server, "ah-mam")
    assert status == 200 and info["peft_type"] == "MAM"
    ref = json.loads((AH_GOLDEN / "bn-mam" / "reference.json").read_text())["cases"][0]
    status, base = complete(server, "smollm2", 6, prompt=ref["prompt"])
    status, ad = complete(server, "ah-mam", 6, prompt=ref["prompt"])
    assert status == 200, ad
    assert ad["usage"]["completion_tokens"] == 6 and ad["usage"]["prompt_tokens"] == len(ref["prompt"])
    assert ad["choices"][0]["text"] != base["choices"][0]["text"], "the adapter changed nothing"
    status, raw = server.post("/v1/adapters/ah-mam/train", {"examples": [{"prompt": "a", "completion": " b"}]})
    assert status == 400 and "not trainable" in json.loads(raw)["error"]["message"], raw
    assert unload(server, "ah-mam")[0] == 200

    cfg = json.loads((dst / "mam" / "adapter_config.json").read_text())
    cases = {
        "unipelt": ([{"architecture": "lora", "r": 8}], "UniPELT"),
        "two-bn": ([dict(cfg["config"]["configs"][1])], "member"),
    }
    for case, (extra, expect) in cases.items():
        shutil.copytree(dst / "mam", dst / case, dirs_exist_ok=True)
        c = json.loads(json.dumps(cfg))
        c["config"]["configs"] += extra
        (dst / case / "adapter_config.json").write_text(json.dumps(c))
        status, text = load(server, f"ah-{case}", f"ah/{case}")
        assert status == 400, text
        assert expect in json.loads(text)["error"]["message"], text
        assert adapter(server, f"ah-{case}")[0] == 404
