"""Delta adapters (sparse weight deltas + bias deltas, README "Delta adapters") through the real
server: loaded at run time, reported as DELTA, served beside LoRA and base requests, and malformed
ones refused with 400 naming the problem. The adapters are written here in pure Python (seeded,
SmolLM2-135M shapes); their numerics are checked against PyTorch by tests/unit/test_delta.c."""
import json
import random
import struct
import threading

from test_adapters import adapter, complete, load, unload

HIDDEN, KV_OUT = 576, 192
WIDTHS = {"q_proj": (HIDDEN, HIDDEN), "v_proj": (HIDDEN, KV_OUT), "o_proj": (HIDDEN, HIDDEN)}  # (in, out)


def write_st(path, tensors):
    """tensors: {name: (dtype "F32"|"I32"|"I64", values)} — all 1-D."""
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    fmt = {"F32": "f", "I32": "i", "I64": "q"}
    for name, (dt, values) in tensors.items():
        blob = struct.pack(f"<{len(values)}{fmt[dt]}", *values)
        header[name] = {"dtype": dt, "shape": [len(values)], "data_offsets": [off, off + len(blob)]}
        blobs.append(blob)
        off += len(blob)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def make_delta(directory, seed, density=0.01, layers=range(6), mutate=None):
    rng = random.Random(seed)
    t = {}
    for layer in layers:
        for proj in ("q_proj", "v_proj"):
            fin, fout = WIDTHS[proj]
            m = f"model.layers.{layer}.self_attn.{proj}"
            ptr, idx, val = [0], [], []
            for _ in range(fout):
                cols = sorted(rng.sample(range(fin), max(1, int(fin * density))))
                idx += cols
                val += [rng.gauss(0, 0.3) for _ in cols]
                ptr.append(len(idx))
            t[m + ".delta_indptr"] = ("I32", ptr)
            t[m + ".delta_indices"] = ("I32", idx)
            t[m + ".delta_values"] = ("F32", val)
        t[f"model.layers.{layer}.self_attn.o_proj.bias_delta"] = ("F32", [rng.gauss(0, 0.1) for _ in range(HIDDEN)])
    if mutate:
        mutate(t)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps({
        "adapter_type": "delta", "version": 1, "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "target_modules": ["q_proj", "v_proj", "o_proj"], "density": density, "source": "tests/server/test_delta.py"}))
    write_st(directory / "adapter_model.safetensors", t)


def test_delta_adapter_served(server):
    make_delta(server.adapter_dir / "deltas" / "d1", seed=7)
    status, text = load(server, "delta1", "deltas/d1")
    assert status == 200, text
    status, info = adapter(server, "delta1")
    assert status == 200 and info["peft_type"] == "DELTA", info
    status, base = complete(server, "smollm2", 6, logprobs=1)
    status, ad = complete(server, "delta1", 6, logprobs=1)
    assert status == 200, ad
    lb = base["choices"][0]["logprobs"]["token_logprobs"]
    la = ad["choices"][0]["logprobs"]["token_logprobs"]
    assert max(abs(a - b) for a, b in zip(la, lb)) > 1e-3, "the delta changed nothing"
    # The same request alone and inside a batch with LoRA and base requests gives the same tokens.
    results = {}

    def run(key, model):
        results[key] = complete(server, model, 6)

    threads = [threading.Thread(target=run, args=(k, m)) for k, m in
               (("d", "delta1"), ("l", "lora0"), ("b", "smollm2"), ("d2", "delta1"))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert all(r[0] == 200 for r in results.values()), results
    alone = complete(server, "delta1", 6)[1]["choices"][0]["text"]
    assert results["d"][1]["choices"][0]["text"] == alone == results["d2"][1]["choices"][0]["text"]
    assert results["b"][1]["choices"][0]["text"] == complete(server, "smollm2", 6)[1]["choices"][0]["text"]
    assert unload(server, "delta1")[0] == 200


def test_malformed_delta_refused(server):
    m = "model.layers.0.self_attn.q_proj"

    def unsorted(t):
        i = t[m + ".delta_indices"][1]
        i[0], i[1] = i[1], i[0]

    def out_of_range(t):
        t[m + ".delta_indices"][1][0] = HIDDEN

    def bad_ptr(t):
        t[m + ".delta_indptr"][1][3] = 0

    def i64(t):
        t[m + ".delta_indices"] = ("I64", t[m + ".delta_indices"][1])

    def wrong_bias(t):
        t["model.layers.0.self_attn.o_proj.bias_delta"] = ("F32", [0.0] * KV_OUT)

    cases = {"unsorted": (unsorted, "strictly ascending"), "range": (out_of_range, "out of range"),
             "ptr": (bad_ptr, "decrease"), "i64": (i64, "dtype I64"), "bias": (wrong_bias, "shape")}
    for name, (mutate, expect) in cases.items():
        make_delta(server.adapter_dir / "deltas" / f"bad-{name}", seed=3, layers=range(1), mutate=mutate)
        status, text = load(server, f"bad-delta-{name}", f"deltas/bad-{name}")
        assert status == 400, (name, text)
        assert expect in json.loads(text)["error"]["message"], (name, text)
        assert adapter(server, f"bad-delta-{name}")[0] == 404


def test_bitfit_sync_train(server):
    """POST /v1/adapters/{id}/train on a bias-only delta adapter trains its bias deltas (BitFit) and
    publishes a new version; a delta with sparse weight deltas is refused as not trainable."""
    def zero_bias_only(t):
        for k in [k for k in t if not k.endswith("bias_delta")]:
            del t[k]
        for k in t:
            t[k] = ("F32", [0.0] * len(t[k][1]))

    make_delta(server.adapter_dir / "deltas" / "bitfit", seed=5, layers=range(30), mutate=zero_bias_only)
    status, text = load(server, "bitfit1", "deltas/bitfit")
    assert status == 200, text
    v = adapter(server, "bitfit1")[1]["version"]
    before = complete(server, "bitfit1", 6, logprobs=1)[1]["choices"][0]["logprobs"]["token_logprobs"]
    examples = [{"prompt": "The secret word is", "completion": " Zanzibar"}] * 2
    status, raw = server.post("/v1/adapters/bitfit1/train", {"examples": examples, "n_epochs": 1,
                                                             "learning_rate": 1e-2}, timeout=600)
    assert status == 200, raw
    out = json.loads(raw)
    assert out["version"] == v + 1 and out["job"]["status"] == "succeeded" and out["job"]["trained_tokens"] > 0, out
    status, info = adapter(server, "bitfit1")
    assert info["version"] == v + 1 and info["peft_type"] == "DELTA"
    after = complete(server, "bitfit1", 6, logprobs=1)[1]["choices"][0]["logprobs"]["token_logprobs"]
    assert max(abs(a - b) for a, b in zip(after, before)) > 1e-4, "training changed nothing"
    make_delta(server.adapter_dir / "deltas" / "sparse", seed=6, layers=range(1))
    assert load(server, "sparse1", "deltas/sparse")[0] == 200
    status, raw = server.post("/v1/adapters/sparse1/train", {"examples": examples})
    assert status == 400 and "not trainable" in json.loads(raw)["error"]["message"], raw
    assert unload(server, "bitfit1")[0] == 200 and unload(server, "sparse1")[0] == 200
