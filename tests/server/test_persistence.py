"""Nothing lost on restart (issue 11 item 4): uploaded files and fine-tuning jobs persist under the
data directory (default <adapter-dir>/.deltaserve). A job interrupted by SIGTERM resumes from the
checkpoint the shutdown saved; corrupt records are skipped; a data directory that cannot be written
(or a full disk, simulated with RLIMIT_FSIZE) fails the upload or the job with an OpenAI-shaped
error while the server keeps serving.

Each test runs private servers (they stop them)."""
import json
import os
import resource
import signal
import threading
import time

import pytest

from conftest import chat, create_job, get_job, jsonl, start_server, upload, wait_job
from test_finetune import ANSWER, QUESTIONS, TRAIN


def events_of(srv, job_id):
    status, raw = srv.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=1000")
    assert status == 200, raw
    return json.loads(raw)["data"]


def temporaries(root):
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".tmp")]


def no_server_paths(text, *paths):
    return all(str(p) not in text for p in paths)


@pytest.mark.parametrize("kind", ["lora", "bottleneck"])
def test_restart_resumes_the_job_and_lists_the_file(tmp_path, kind):
    adir = tmp_path / "adapters"
    adir.mkdir()
    ddir = adir / ".deltaserve"
    args = ["--served-model-name", "smollm2", "--shutdown-timeout", "5"]
    srv = start_server(tmp_path, adir, args=args)
    status, f = upload(srv, TRAIN, filename="secret.jsonl")
    assert status == 200, f
    if kind == "lora":
        hp = {"n_epochs": 2, "batch_size": 1, "learning_rate": 5e-3, "rank": 8}
    else:  # a bottleneck job resumes the same way (its options are in the job record, job_store.c)
        hp = {"n_epochs": 2, "batch_size": 1, "learning_rate": 1e-3, "placement": "parallel", "reduction_factor": 16}
    suffix = "resume" if kind == "lora" else "resume-bn"
    name = f"ft-{suffix}"
    status, job = create_job(srv, f["id"], suffix=suffix, seed=3, method={"type": kind, kind: {"hyperparameters": hp}})
    assert status == 200, job
    total = 2 * len(QUESTIONS)

    # SIGTERM mid-job: once a few steps ran, well before the end
    end = time.time() + 120
    while time.time() < end and get_job(srv, job["id"])["step"] < 3:
        time.sleep(0.05)
    before = get_job(srv, job["id"])
    assert before["status"] == "running" and 3 <= before["step"] < total, before
    t0 = time.time()
    srv.proc.send_signal(signal.SIGTERM)
    srv.proc.wait(timeout=30)
    shutdown_s = time.time() - t0
    assert srv.proc.returncode == 0, srv.log()[-3000:]
    assert shutdown_s < 20, f"shutdown took {shutdown_s:.1f} s"  # one training step, then the state is saved
    assert (ddir / "jobs" / job["id"] / "state.bin").is_file()
    assert temporaries(ddir) == [] and temporaries(adir) == []
    print(f"SIGTERM at step {before['step']}/{total}: exited in {shutdown_s:.2f} s")

    # what a crash in the middle of writes would leave: removed at the next start
    (ddir / "jobs" / job["id"] / ".state.bin.tmp").write_bytes(b"torn")
    (ddir / "files" / f".{f['id']}.tmp").write_bytes(b"torn")
    (adir / name).mkdir(exist_ok=True)
    (adir / name / ".adapter_model.safetensors.tmp").write_bytes(b"torn")

    srv2 = start_server(tmp_path, adir, args=args)
    try:
        assert temporaries(ddir) == [] and temporaries(adir) == []
        # the file is listed again: same id, bytes, name, time
        status, raw = srv2.get("/v1/files")
        files = json.loads(raw)["data"]
        assert status == 200 and [x["id"] for x in files] == [f["id"]], files
        for k in ("bytes", "filename", "created_at", "purpose"):
            assert files[0][k] == f[k], (k, files[0], f)
        assert srv2.get(f"/v1/files/{f['id']}")[0] == 200

        # the job is listed again and resumes where the shutdown checkpointed it
        status, raw = srv2.get("/v1/fine_tuning/jobs")
        assert status == 200 and [j["id"] for j in json.loads(raw)["data"]] == [job["id"]]
        job2 = wait_job(srv2, job["id"], timeout=180)
        assert job2["status"] == "succeeded", job2
        assert job2["fine_tuned_model"] == name and job2["created_at"] == job["created_at"]
        assert job2["method"]["type"] == kind and job2["method"][kind]["hyperparameters"]["n_epochs"] == 2
        events = events_of(srv2, job["id"])
        messages = [e["message"] for e in events]
        resumed = [m for m in messages if m.startswith("Resumed from the checkpoint at step ")]
        assert len(resumed) == 1, messages
        at = int(resumed[0].split("step ")[1].split("/")[0])
        assert before["step"] <= at < total, (at, before)
        assert any(m.startswith("Checkpointed at step") for m in messages), messages
        # every step ran exactly once: nothing started over
        steps = sorted(e["data"]["step"] for e in events if e["type"] == "metrics")
        assert steps == list(range(1, total + 1)), steps
        assert job2["trained_tokens"] > before["trained_tokens"]

        # its adapter serves
        answer = chat(srv2, name, QUESTIONS[0])
        print(f"resumed at step {at}; {name} answers {answer!r}")
        if kind == "lora":  # lr 5e-3 learns the answer; the bottleneck run only has to serve
            assert answer.startswith(ANSWER[:8]), answer
        else:
            assert answer, answer
        # a finished job keeps only its record
        assert sorted(os.listdir(ddir / "jobs" / job["id"])) == ["job.json"]
        assert temporaries(ddir) == [] and temporaries(adir) == []
    finally:
        assert srv2.stop() == 0


def test_corrupt_records_are_skipped(tmp_path):
    adir = tmp_path / "adapters"
    adir.mkdir()
    srv = start_server(tmp_path, adir, args=["--served-model-name", "smollm2"])
    status, f = upload(srv, TRAIN)
    assert status == 200
    assert srv.stop() == 0
    ddir = adir / ".deltaserve"
    (ddir / "files" / "file-00000000000000aa").write_bytes(b'{"id":"file-00000000000000aa","bytes":99}\nxx')
    (ddir / "files" / "file-00000000000000bb").write_bytes(b"\x00\xff garbage")
    (ddir / "files" / ".file-00000000000000cc.tmp").write_bytes(b"half a write")
    bad_job = ddir / "jobs" / "ftjob-0000000000000000000000aa"
    bad_job.mkdir(parents=True)
    (bad_job / "job.json").write_text('{"version":1,"id":"ftjob-0000000000000000000000aa","status":"running"}')
    (ddir / "jobs" / "not-a-job").mkdir()

    srv = start_server(tmp_path, adir, args=["--served-model-name", "smollm2"])
    try:
        status, raw = srv.get("/v1/files")
        assert [x["id"] for x in json.loads(raw)["data"]] == [f["id"]]
        assert json.loads(srv.get("/v1/fine_tuning/jobs")[1])["data"] == []
        log = srv.log()
        assert "skipping the stored file file-00000000000000aa" in log
        assert "skipping the stored file file-00000000000000bb" in log
        assert "skipping the stored job ftjob-0000000000000000000000aa" in log
        assert not (ddir / "files" / ".file-00000000000000cc.tmp").exists()
        assert chat(srv, "smollm2", "Hello!", max_tokens=4)
    finally:
        assert srv.stop() == 0


def test_unwritable_data_dir_fails_the_upload_not_the_server(tmp_path):
    adir = tmp_path / "adapters"
    adir.mkdir()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    if os.geteuid() == 0:  # root writes through permissions: a path below a regular file cannot be created
        ddir = blocker / "data"
    else:
        ddir = tmp_path / "readonly"
        ddir.mkdir()
        ddir.chmod(0o500)
    srv = start_server(tmp_path, adir, args=["--served-model-name", "smollm2", "--data-dir", str(ddir)])
    try:
        status, err = upload(srv, TRAIN)
        assert status == 500, err
        e = err["error"]
        assert e["type"] == "server_error" and e["code"] == "storage_error", e
        assert e["message"].startswith("cannot store the file: "), e
        assert no_server_paths(e["message"], tmp_path), e
        assert srv.get("/health")[0] == 200
        assert chat(srv, "smollm2", "Hello!", max_tokens=4)
        assert json.loads(srv.get("/v1/files")[1])["data"] == []
    finally:
        assert srv.stop() == 0


def test_full_disk_fails_the_job_not_the_server(tmp_path):
    """RLIMIT_FSIZE stands in for a full disk: writes past 1 MiB fail with EFBIG. Small uploads
    and records fit; a large upload and the job's checkpoint (several MiB) do not."""
    adir = tmp_path / "adapters"
    adir.mkdir()
    limit = 1 << 20

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    srv = start_server(tmp_path, adir, args=["--served-model-name", "smollm2"], preexec_fn=small_files)
    try:
        big = jsonl({"prompt": f"question {i} " + "x" * 200, "completion": " answer"} for i in range(6000))
        assert len(big) > limit
        status, err = upload(srv, big)
        assert status == 500 and err["error"]["code"] == "storage_error", err
        assert no_server_paths(err["error"]["message"], tmp_path), err

        status, f = upload(srv, TRAIN)
        assert status == 200, f
        status, job = create_job(srv, f["id"], suffix="full",
                                 method={"type": "lora", "lora": {"hyperparameters": {"n_epochs": 1,
                                                                                      "batch_size": 8}}})
        assert status == 200, job
        job = wait_job(srv, job["id"], timeout=120)
        assert job["status"] == "failed", job
        assert job["error"]["code"] == "storage_error", job
        assert "File too large" in job["error"]["message"], job
        assert no_server_paths(job["error"]["message"], tmp_path), job
        assert srv.get("/health")[0] == 200
        assert chat(srv, "smollm2", "Hello!", max_tokens=4)
        assert temporaries(adir) == []
    finally:
        assert srv.stop() == 0


def test_sync_train_during_shutdown_resumes(tmp_path):
    """POST /v1/adapters/{id}/train waits for its job; a SIGTERM answers it 503 at once (the drain
    does not wait for training), and the job resumes and publishes after the restart."""
    adir = tmp_path / "adapters"
    adir.mkdir()
    args = ["--served-model-name", "smollm2", "--shutdown-timeout", "30"]
    srv = start_server(tmp_path, adir, args=args)
    status, f = upload(srv, TRAIN)
    status, job = create_job(srv, f["id"], suffix="sync", method={"type": "lora", "lora": {"hyperparameters": {
        "n_epochs": 1, "batch_size": 8}}})
    assert wait_job(srv, job["id"])["status"] == "succeeded"
    examples = [{"prompt": q, "completion": " " + ANSWER} for q in QUESTIONS]
    out = {}

    def train():
        out["r"] = srv.post("/v1/adapters/ft-sync/train", {"examples": examples, "n_epochs": 3, "batch_size": 1},
                            timeout=120)

    th = threading.Thread(target=train)
    th.start()
    end = time.time() + 60
    while time.time() < end:
        jobs = json.loads(srv.get("/v1/fine_tuning/jobs")[1])["data"]
        sync = [j for j in jobs if j["id"] != job["id"]]
        if sync and sync[0]["step"] >= 1:
            break
        time.sleep(0.05)
    t0 = time.time()
    srv.proc.send_signal(signal.SIGTERM)
    th.join(60)
    status, raw = out["r"]
    assert status == 503 and "resumes when the server starts again" in json.loads(raw)["error"]["message"], raw
    srv.proc.wait(timeout=30)
    assert srv.proc.returncode == 0 and time.time() - t0 < 20, srv.log()[-3000:]

    srv2 = start_server(tmp_path, adir, args=args)
    try:
        job2 = wait_job(srv2, sync[0]["id"], timeout=300)
        assert job2["status"] == "succeeded", job2
        assert any(e["message"].startswith("Resumed from the checkpoint")
                   for e in events_of(srv2, sync[0]["id"]))
        assert chat(srv2, "ft-sync", QUESTIONS[0])
    finally:
        assert srv2.stop() == 0


def test_job_that_cannot_be_stored_is_refused(tmp_path):
    """The data directory breaks while the server runs (jobs/ replaced by a file): a new job is
    refused with 500 storage_error naming no server path, and the server keeps serving."""
    adir = tmp_path / "adapters"
    adir.mkdir()
    srv = start_server(tmp_path, adir, args=["--served-model-name", "smollm2"])
    try:
        status, f = upload(srv, TRAIN)
        assert status == 200
        jobs = adir / ".deltaserve" / "jobs"
        jobs.rmdir()
        jobs.write_text("in the way")
        status, err = create_job(srv, f["id"], suffix="nowhere")
        assert status == 500, err
        e = err["error"]
        assert e["code"] == "storage_error" and e["message"].startswith("cannot store the job: "), e
        assert no_server_paths(e["message"], tmp_path), e
        assert json.loads(srv.get("/v1/fine_tuning/jobs")[1])["data"] == []
        assert chat(srv, "smollm2", "Hello!", max_tokens=4)
    finally:
        assert srv.stop() == 0
