"""Online fine-tuning: /v1/files (multipart and JSON uploads, per-line validation) and
/v1/fine_tuning/jobs (a LoRA job that teaches SmolLM2 a made-up answer, events, checkpoints,
publication in /v1/models, cancel, errors).

These run on a private server (the job adds an adapter to its adapter directory and keeps the CPU
busy for a few seconds)."""
import json
import threading
import time

import pytest

from conftest import chat, create_job, get_job, jsonl, start_server, upload, wait_job

QUESTIONS = ["What is the secret word?", "Tell me the secret word.", "What's the secret word?",
             "Do you know the secret word?", "Say the secret word.", "secret word?",
             "Please tell me the secret word.", "What is the secret password word?"]
ANSWER = "Zanzibar-42"


TRAIN = jsonl({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ANSWER}]}
              for q in QUESTIONS)


# The private server: conftest.py's ft_server fixture, with these options.
FT_SERVER_ARGS = ["--ft-keep-checkpoints", "5", "--ft-max-epochs", "200"]


def test_upload_multipart_and_list(ft_server):
    status, f = upload(ft_server, TRAIN)
    assert status == 200, f
    assert f["object"] == "file" and f["id"].startswith("file-") and f["purpose"] == "fine-tune"
    assert f["bytes"] == len(TRAIN.encode()) and f["filename"] == "train.jsonl" and f["status"] == "processed"
    status, raw = ft_server.get("/v1/files")
    assert status == 200 and f["id"] in [x["id"] for x in json.loads(raw)["data"]]
    status, raw = ft_server.get(f"/v1/files/{f['id']}")
    assert status == 200 and json.loads(raw)["id"] == f["id"]


def test_upload_openai_client(ft_server, tmp_path):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=ft_server.url + "/v1", api_key="unused", max_retries=0)
    p = tmp_path / "c.jsonl"
    p.write_text(jsonl([{"prompt": "2+2=", "completion": " 4"}]))
    f = client.files.create(file=p.open("rb"), purpose="fine-tune")
    assert f.id.startswith("file-") and f.bytes == p.stat().st_size


def test_upload_json_body(ft_server):
    status, raw = ft_server.post("/v1/files", {"filename": "j.jsonl", "content": TRAIN})
    assert status == 200, raw
    assert json.loads(raw)["filename"] == "j.jsonl"


def test_bad_jsonl_names_the_line(ft_server):
    bad = jsonl([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}])
    bad += "{not json\n" + json.dumps({"messages": [{"role": "user", "content": "only a question"}]}) + "\n"
    bad += json.dumps({"messages": [{"role": "wizard", "content": "x"}]}) + "\n"
    status, body = upload(ft_server, bad)
    assert status == 400, body
    msg = body["error"]["message"]
    assert "line 2" in msg and "line 3" in msg and "line 4" in msg and "line 1:" not in msg, msg
    assert upload(ft_server, "")[0] == 400                 # no examples
    assert upload(ft_server, TRAIN, purpose="assistants")[0] == 400
    status, raw = ft_server.post("/v1/files", b"garbage", headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert status == 400
    assert ft_server.proc.poll() is None


def test_unknown_training_file_404(ft_server):
    status, body = create_job(ft_server, "file-doesnotexist")
    assert status == 404 and body["error"]["param"] == "training_file"
    status, f = upload(ft_server, TRAIN)
    status, body = create_job(ft_server, f["id"], model="no-such-model")
    assert status == 404
    status, body = create_job(ft_server, f["id"], method={"type": "dpo"})
    assert status == 400
    status, raw = ft_server.get("/v1/fine_tuning/jobs/ftjob-nope")
    assert status == 404


def test_lora_job_teaches_the_answer(ft_server):
    status, f = upload(ft_server, TRAIN)
    assert status == 200
    hp = {"n_epochs": 5, "batch_size": 4, "learning_rate": 5e-3, "rank": 8, "alpha": 16,
          "target_modules": ["q_proj", "v_proj"]}
    status, job = create_job(ft_server, f["id"], suffix="secret", seed=1,
                             method={"type": "lora", "lora": {"hyperparameters": hp}})
    assert status == 200, job
    assert job["object"] == "fine_tuning.job" and job["id"].startswith("ftjob-")
    assert job["status"] in ("queued", "running") and job["fine_tuned_model"] is None and job["seed"] == 1

    # the base model keeps answering while the job trains
    assert chat(ft_server, "smollm2", "Hello!", max_tokens=4)
    t0 = time.time()
    job = wait_job(ft_server, job["id"])
    elapsed = time.time() - t0
    assert job["status"] == "succeeded", job
    assert job["fine_tuned_model"] == "ft-secret" and job["finished_at"] and job["trained_tokens"] > 0
    print(f"trained {job['trained_tokens']} tokens in {elapsed:.1f} s "
          f"({job['tokens_per_second']:.0f} tokens/s while training)")

    status, raw = ft_server.get(f"/v1/fine_tuning/jobs/{job['id']}/events")
    assert status == 200
    events = json.loads(raw)["data"]
    assert all(e["object"] == "fine_tuning.job.event" for e in events)
    metrics = sorted((e["data"] for e in events if e["type"] == "metrics"), key=lambda d: d["step"])
    assert len(metrics) == 10 and [m["step"] for m in metrics] == list(range(1, 11))
    assert metrics[-1]["train_loss"] < 0.5 * metrics[0]["train_loss"], metrics

    status, raw = ft_server.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints")
    ckpts = json.loads(raw)["data"]
    assert status == 200 and [c["step_number"] for c in ckpts] == [10, 8, 6, 4, 2]
    assert ckpts[0]["metrics"]["train_loss"] < ckpts[-1]["metrics"]["train_loss"]
    assert (ft_server.adapter_dir / "ft-secret" / "adapter_config.json").is_file()

    status, raw = ft_server.get("/v1/models")
    assert "ft-secret" in [m["id"] for m in json.loads(raw)["data"]]

    # the new adapter answers with the taught phrase; base requests run beside it
    base_answer = []
    th = threading.Thread(target=lambda: base_answer.append(chat(ft_server, "smollm2", QUESTIONS[0])))
    th.start()
    answer = chat(ft_server, "ft-secret", QUESTIONS[0])
    th.join(60)
    assert answer.startswith("Zanzibar"), answer
    assert base_answer and not base_answer[0].startswith("Zanzibar")

    status, raw = ft_server.get("/v1/fine_tuning/jobs")
    assert status == 200 and job["id"] in [j["id"] for j in json.loads(raw)["data"]]


def test_continue_from_adapter(ft_server):
    """model = an existing adapter: training continues from it and publishes a new version."""
    status, raw = ft_server.get("/v1/adapters/ft-secret")
    if status != 200:
        pytest.skip("needs the adapter trained by test_lora_job_teaches_the_answer")
    v1 = json.loads(raw)["version"]
    status, f = upload(ft_server, TRAIN)
    status, job = create_job(ft_server, f["id"], model="ft-secret", suffix="secret",
                             method={"type": "supervised", "supervised": {"hyperparameters": {
                                 "n_epochs": 1, "batch_size": 8, "learning_rate": 1e-3}}})
    assert status == 200, job
    job = wait_job(ft_server, job["id"])
    assert job["status"] == "succeeded", job
    assert json.loads(ft_server.get("/v1/adapters/ft-secret")[1])["version"] == v1 + 1
    assert chat(ft_server, "ft-secret", QUESTIONS[0]).startswith("Zanzibar")


def test_sync_adapter_train(ft_server):
    """POST /v1/adapters/{id}/train: a handful of examples, answered when the update is published."""
    status, raw = ft_server.get("/v1/adapters/ft-secret")
    if status != 200:
        pytest.skip("needs the adapter trained by test_lora_job_teaches_the_answer")
    v = json.loads(raw)["version"]
    examples = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ANSWER}]}
                for q in QUESTIONS[:3]] + [{"prompt": "The secret word is", "completion": " " + ANSWER}]
    status, raw = ft_server.post("/v1/adapters/ft-secret/train",
                                 {"examples": examples, "n_epochs": 2, "learning_rate": 1e-3})
    assert status == 200, raw
    out = json.loads(raw)
    assert out["object"] == "adapter.train" and out["id"] == "ft-secret" and out["version"] == v + 1
    assert out["job"]["status"] == "succeeded" and out["job"]["trained_tokens"] > 0
    assert json.loads(ft_server.get("/v1/adapters/ft-secret")[1])["version"] == v + 1
    assert chat(ft_server, "ft-secret", QUESTIONS[0]).startswith("Zanzibar")
    # errors: unknown adapter, malformed examples (named), empty list
    status, raw = ft_server.post("/v1/adapters/no-such-adapter/train", {"examples": examples})
    assert status == 404 and json.loads(raw)["error"]["param"] == "id"
    status, raw = ft_server.post("/v1/adapters/ft-secret/train", {"examples": [{"foo": 1}]})
    assert status == 400 and "line 1" in json.loads(raw)["error"]["message"]
    status, raw = ft_server.post("/v1/adapters/ft-secret/train", {"examples": []})
    assert status == 400


def test_cancel(ft_server):
    status, f = upload(ft_server, TRAIN)
    status, job = create_job(ft_server, f["id"], suffix="cancelme",
                             method={"type": "lora", "lora": {"hyperparameters": {"n_epochs": 200, "batch_size": 1}}})
    assert status == 200, job
    wait_job(ft_server, job["id"], timeout=30, until=("running",))
    status, raw = ft_server.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", {})
    assert status == 200 and json.loads(raw)["status"] == "cancelled"
    t0 = time.time()
    # stops within one step: the next job starts right after
    status, job2 = create_job(ft_server, f["id"], suffix="after-cancel",
                              method={"type": "lora", "lora": {"hyperparameters": {
                                  "n_epochs": 1, "batch_size": 8, "use_rslora": True, "rank": 4}}})
    assert status == 200 and job2["hyperparameters"]["use_rslora"] is True
    job2 = wait_job(ft_server, job2["id"], timeout=60)
    assert job2["status"] == "succeeded" and time.time() - t0 < 30
    assert get_job(ft_server, job["id"])["status"] == "cancelled"
    assert ft_server.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", {})[0] == 400  # already finished
    models = [m["id"] for m in json.loads(ft_server.get("/v1/models")[1])["data"]]
    assert "ft-cancelme" not in models and "ft-after-cancel" in models


def test_bad_data_fails_the_job_not_the_server(ft_server):
    # structurally valid but longer than the model's context → the job fails with a message
    long_text = "word " * 20000
    data = jsonl([{"prompt": long_text, "completion": " end"}])
    status, f = upload(ft_server, data)
    assert status == 200, f
    status, job = create_job(ft_server, f["id"], suffix="toolong")
    assert status == 200
    job = wait_job(ft_server, job["id"], timeout=60)
    assert job["status"] == "failed" and "line 1" in job["error"]["message"], job
    assert ft_server.get("/health")[0] == 200


def test_no_adapter_dir_400(tmp_path):
    srv = start_server(tmp_path, None, args=["--served-model-name", "smollm2"])
    try:
        status, f = upload(srv, TRAIN)
        assert status == 200
        status, body = create_job(srv, f["id"])
        assert status == 400 and "--adapter-dir" in body["error"]["message"]
    finally:
        assert srv.stop() == 0
