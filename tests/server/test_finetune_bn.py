"""Fine-tuning bottleneck adapters over HTTP (method "bottleneck", src/train/train_bn.c): a job
trains a parallel adapter (scaled, He et al.) on SmolLM2 to give a made-up answer, publishes it in
the AdapterHub format (adapter_config.json + adapter.safetensors) and serves it through
/v1/completions and /v1/chat/completions; the adapter then trains further through
POST /v1/adapters/{id}/train; bad hyperparameters are refused by name with a 400.

A private server: the job adds an adapter to its adapter directory and keeps the CPU busy."""
import json

import pytest

from conftest import start_server
from test_finetune import ANSWER, QUESTIONS, TRAIN, chat, create_job, upload, wait_job


@pytest.fixture(scope="module")
def bn_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ftbn")
    adir = tmp / "adapters"
    adir.mkdir()
    srv = start_server(tmp, adir, args=["--served-model-name", "smollm2"])
    yield srv
    rc = srv.stop()
    assert rc == 0, f"server exited with {rc}:\n{srv.log()[-4000:]}"


def completion(srv, model, prompt, max_tokens=6):
    status, raw = srv.post("/v1/completions", {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                               "temperature": 0, "logprobs": 1})
    assert status == 200, raw
    return json.loads(raw)["choices"][0]


def test_bottleneck_job_trains_saves_and_serves(bn_server):
    status, f = upload(bn_server, TRAIN)
    assert status == 200
    hp = {"n_epochs": 5, "batch_size": 4, "learning_rate": 1e-3, "placement": "parallel", "reduction_factor": 16,
          "non_linearity": "gelu"}
    status, job = create_job(bn_server, f["id"], suffix="bn", seed=3,
                             method={"type": "bottleneck", "bottleneck": {"hyperparameters": hp}})
    assert status == 200, job
    got = job["method"]["bottleneck"]["hyperparameters"]
    assert job["method"]["type"] == "bottleneck"
    assert (got["placement"], got["reduction_factor"], got["non_linearity"], got["scaling"], got["init_weights"]) == \
        ("parallel", 16, "gelu", 4, "mam_adapter"), got
    job = wait_job(bn_server, job["id"], timeout=600)
    assert job["status"] == "succeeded", job
    name = job["fine_tuned_model"]
    assert name == "ft-bn" and job["trained_tokens"] > 0
    status, raw = bn_server.get(f"/v1/fine_tuning/jobs/{job['id']}/events")
    metrics = sorted((e["data"] for e in json.loads(raw)["data"] if e["type"] == "metrics"), key=lambda d: d["step"])
    losses = [round(m["train_loss"], 3) for m in metrics]
    print("train loss per step:", losses)
    assert len(metrics) == 10 and losses[-1] < 0.5 * losses[0], losses

    # published in the AdapterHub format, as the package's save_adapter writes it
    d = bn_server.adapter_dir / name
    assert (d / "adapter.safetensors").is_file() and not (d / "adapter_model.safetensors").exists()
    cfg = json.loads((d / "adapter_config.json").read_text())
    c = cfg["config"]
    assert cfg["name"] == name and cfg["hidden_size"] == 576 and cfg["model_type"] == "llama"
    assert c["is_parallel"] is True and c["scaling"] == 4.0 and isinstance(c["scaling"], float)
    assert c["reduction_factor"] == 16 and c["non_linearity"] == "gelu" and c["output_adapter"] and not c["mh_adapter"]

    status, raw = bn_server.get(f"/v1/adapters/{name}")
    assert status == 200 and json.loads(raw)["peft_type"] == "BOTTLENECK", raw
    status, raw = bn_server.get("/v1/models")
    assert name in [m["id"] for m in json.loads(raw)["data"]]

    # it serves, differently from the base, and has learnt the answer
    ours, base = completion(bn_server, name, QUESTIONS[0]), completion(bn_server, "smollm2", QUESTIONS[0])
    assert ours["logprobs"]["tokens"] != base["logprobs"]["tokens"] or \
        max(abs(a - b) for a, b in zip(ours["logprobs"]["token_logprobs"], base["logprobs"]["token_logprobs"])) > 1e-3
    answer = chat(bn_server, name, QUESTIONS[0])
    assert answer.startswith("Zanzibar"), answer
    assert not chat(bn_server, "smollm2", QUESTIONS[0]).startswith("Zanzibar")

    # training continues from the published adapter and publishes a new version
    v = json.loads(bn_server.get(f"/v1/adapters/{name}")[1])["version"]
    examples = [{"prompt": "The secret word is", "completion": " " + ANSWER}] * 2
    status, raw = bn_server.post(f"/v1/adapters/{name}/train", {"examples": examples, "n_epochs": 1,
                                                                 "learning_rate": 1e-3}, timeout=600)
    assert status == 200, raw
    assert json.loads(raw)["version"] == v + 1
    assert completion(bn_server, name, "The secret word is")["text"]


@pytest.mark.parametrize("hp,param,code", [
    ({"placement": "diagonal"}, "placement", None),
    ({"non_linearity": "sigmoid"}, "non_linearity", "unsupported"),
    ({"non_linearity": 3}, "non_linearity", None),
    ({"reduction_factor": 0}, "reduction_factor", None),
    ({"reduction_factor": 2.5}, "reduction_factor", None),
    ({"scaling": "learned"}, "scaling", "unsupported"),
    ({"init_weights": "houlsby"}, "init_weights", None),
])
def test_bad_bottleneck_hyperparameters(bn_server, hp, param, code):
    status, f = upload(bn_server, TRAIN)
    assert status == 200
    status, body = create_job(bn_server, f["id"], method={"type": "bottleneck", "bottleneck": {"hyperparameters": hp}})
    assert status == 400, body
    assert body["error"]["param"] == param and body["error"]["code"] == code, body
    assert param in body["error"]["message"] or str(list(hp.values())[0]) in body["error"]["message"], body
