"""Diff-pruning training through the fine-tuning API (method "diff_pruning", src/train/train_dp.c):
a job trains a dense delta on its target projections for `warmup_steps`, fixes each module's mask
of the top `density` |δ|, trains the masked entries and publishes a sparse delta adapter, listed
as peft_type DELTA and served. Bad hyperparameters are 400 before anything is queued, and the dense
warm-up must fit --adapter-budget-mb. The numerics (gradients, masked AdamW, served logits of
base + δ) are checked against PyTorch by tests/unit/test_train_diff_pruning.c."""
import json
import math
import struct

import pytest

from conftest import start_server
from test_adapters import complete
from test_finetune import create_job, jsonl, upload, wait_job

HIDDEN, KV_OUT, LAYERS = 576, 192, 30  # SmolLM2-135M: v_proj is [192][576]
ROWS = jsonl([{"prompt": f"{i}+{i}=", "completion": f" {2 * i}"} for i in range(1, 5)])


@pytest.fixture(scope="module")
def dp_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dp")
    adir = tmp / "adapters"
    adir.mkdir()
    # 16 MiB: v_proj's dense delta (30 x 192 x 576 fp32 = 12.7 MiB) fits, all-linear (405 MiB) does not
    srv = start_server(tmp, adir, args=["--served-model-name", "smollm2", "--adapter-budget-mb", "16"])
    yield srv
    rc = srv.stop()
    assert rc == 0, f"server exited with {rc}:\n{srv.log()[-4000:]}"


def dp_method(**hp):
    return {"type": "diff_pruning", "diff_pruning": {"hyperparameters": hp}}


def read_st(path):
    """{name: (dtype, shape, bytes)} of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    return {k: (v["dtype"], v["shape"], raw[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]])
            for k, v in header.items()}


def test_job_trains_a_sparse_delta_that_serves(dp_server):
    status, f = upload(dp_server, ROWS)
    assert status == 200, f
    hp = {"density": 0.01, "warmup_steps": 2, "bias": True, "target_modules": ["v_proj"], "n_epochs": 2,
          "batch_size": 2, "learning_rate": 1e-3}
    status, job = create_job(dp_server, f["id"], method=dp_method(**hp), suffix="dp1")
    assert status == 200, job
    assert job["method"]["type"] == "diff_pruning"
    shown = job["method"]["diff_pruning"]["hyperparameters"]
    assert shown["warmup_steps"] == 2 and shown["bias"] is True and shown["target_modules"] == ["v_proj"], shown
    assert abs(shown["density"] - 0.01) < 1e-6, shown
    job = wait_job(dp_server, job["id"], timeout=300)
    assert job["status"] == "succeeded", job
    assert job["total_steps"] == 4 and job["fine_tuned_model"] == "ft-dp1"

    # listed as a delta adapter
    status, raw = dp_server.get("/v1/adapters")
    assert status == 200, raw
    listed = {a["id"]: a for a in json.loads(raw)["data"]}
    assert listed["ft-dp1"]["peft_type"] == "DELTA", listed["ft-dp1"]

    # the files: per layer a CSR v_proj delta of at most ceil(1%) entries and a bias delta
    d = dp_server.adapter_dir / "ft-dp1"
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["adapter_type"] == "delta" and "v_proj" in cfg["target_modules"], cfg
    st = read_st(d / "adapter_model.safetensors")
    k = math.ceil(0.01 * HIDDEN * KV_OUT)
    for layer in range(LAYERS):
        m = f"model.layers.{layer}.self_attn.v_proj"
        dt, shape, data = st[m + ".delta_indptr"]
        assert dt == "I32" and shape == [KV_OUT + 1]
        nnz = struct.unpack(f"<{KV_OUT + 1}i", data)[-1]
        assert 0 < nnz <= k, (m, nnz, k)
        assert st[m + ".delta_values"][1] == [nnz] and st[m + ".bias_delta"][1] == [KV_OUT]
    assert not [n for n in st if ".q_proj." in n or ".o_proj." in n]

    # it serves, and differs from the base
    status, base = complete(dp_server, "smollm2", 4, logprobs=1)
    assert status == 200, base
    status, tuned = complete(dp_server, "ft-dp1", 4, logprobs=1)
    assert status == 200, tuned
    lb = base["choices"][0]["logprobs"]["token_logprobs"]
    lt = tuned["choices"][0]["logprobs"]["token_logprobs"]
    assert len(lt) == 4 and all(math.isfinite(x) for x in lt)
    assert lb != lt, "the trained delta left the output unchanged"


@pytest.mark.parametrize("hp,param", [
    ({"density": 0, "target_modules": ["v_proj"]}, "density"),
    ({"density": -0.5, "target_modules": ["v_proj"]}, "density"),
    ({"density": 1.5, "target_modules": ["v_proj"]}, "density"),
    ({"density": "1%", "target_modules": ["v_proj"]}, "density"),
    ({"density": 0.01}, "target_modules"),
    ({"density": 0.01, "target_modules": ["lm_head"]}, "target_modules"),
    ({"density": 0.01, "target_modules": ["v_proj"], "warmup_steps": 0}, "warmup_steps"),
    ({"density": 0.01, "target_modules": ["v_proj"], "bias": "yes"}, "bias"),
])
def test_bad_hyperparameters_are_400(dp_server, hp, param):
    status, f = upload(dp_server, ROWS)
    assert status == 200, f
    status, body = create_job(dp_server, f["id"], method=dp_method(**hp))
    assert status == 400, body
    assert body["error"]["param"] == param, body
    assert body["error"]["type"] == "invalid_request_error", body


def test_dense_warmup_must_fit_the_adapter_budget(dp_server):
    status, f = upload(dp_server, ROWS)
    before = len(json.loads(dp_server.get("/v1/fine_tuning/jobs")[1])["data"])
    status, body = create_job(dp_server, f["id"], method=dp_method(density=0.01, target_modules="all-linear"))
    assert status == 400, body
    msg = body["error"]["message"]
    assert "dense warm-up" in msg and "--adapter-budget-mb 16 MiB" in msg, msg
    assert len(json.loads(dp_server.get("/v1/fine_tuning/jobs")[1])["data"]) == before  # nothing queued


def test_unknown_method_names_diff_pruning(dp_server):
    status, f = upload(dp_server, ROWS)
    status, body = create_job(dp_server, f["id"], method={"type": "diff_prune"})
    assert status == 400 and "diff_pruning" in body["error"]["message"], body
