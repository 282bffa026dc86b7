"""Fine-tuning limits (issue 14, item 2): a small job request must not make the server hold
gigabytes or fill the disk. The adapter a job would produce must fit --adapter-budget-mb, its disk
use (adapter + kept checkpoints + resumable state) --ft-disk-quota-mb, its n_epochs --ft-max-epochs;
only the newest --ft-keep-checkpoints epoch checkpoints stay on disk. Errors name no server path."""
import json

from conftest import create_job, jsonl, start_server, upload, wait_job

TINY = jsonl([{"prompt": "2+2=", "completion": " 4"}, {"prompt": "3+3=", "completion": " 6"}])


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# The private server: conftest.py's ft_server fixture, with these options.
FT_SERVER_ARGS = ["--ft-keep-checkpoints", "1", "--ft-max-epochs", "20"]


def no_path(srv, text):
    assert str(srv.tmp) not in text and "/tmp/" not in text, text


def test_the_amplifying_job_of_the_issue_is_400(ft_server):
    """The reported 259-byte job: rank 512 on q/o/gate/up/down + lm_head + embed_tokens, 2 epochs —
    a ~735 MiB adapter (4.3 GiB of RSS and 2.1 GB written before); refused before anything runs."""
    status, f = upload(ft_server, TINY)
    assert status == 200, f
    before = rss_kib(ft_server.proc.pid)
    hp = {"n_epochs": 2, "rank": 512,
          "target_modules": ["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head", "embed_tokens"]}
    body = {"model": "smollm2", "training_file": f["id"], "hyperparameters": hp}
    assert len(json.dumps(body)) < 300
    status, raw = ft_server.post("/v1/fine_tuning/jobs", body)
    assert status == 400, raw
    msg = json.loads(raw)["error"]["message"]
    assert "adapter budget" in msg and "--adapter-budget-mb" in msg, msg
    no_path(ft_server, msg)
    assert rss_kib(ft_server.proc.pid) - before < 32 << 10  # KiB
    status, raw = ft_server.get("/v1/fine_tuning/jobs")
    assert status == 200 and json.loads(raw)["data"] == []  # nothing was queued
    assert not list((ft_server.adapter_dir / ".deltaserve" / "jobs").glob("ftjob*"))


def test_epochs_over_the_limit_are_400(ft_server):
    status, f = upload(ft_server, TINY)
    status, body = create_job(ft_server, f["id"], hyperparameters={"n_epochs": 21})
    assert status == 400, body
    assert "--ft-max-epochs 20" in body["error"]["message"]
    status, body = create_job(ft_server, f["id"], hyperparameters={"n_epochs": 1001})
    assert status == 400, body


def test_only_the_newest_checkpoints_are_kept(ft_server):
    status, f = upload(ft_server, TINY)
    hp = {"n_epochs": 3, "batch_size": 2, "rank": 1, "target_modules": ["q_proj"]}
    status, job = create_job(ft_server, f["id"], hyperparameters=hp, suffix="keep1")
    assert status == 200, job
    job = wait_job(ft_server, job["id"], timeout=120)
    assert job["status"] == "succeeded", job
    status, raw = ft_server.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints")
    assert status == 200
    ck = json.loads(raw)["data"]
    assert len(ck) == 1 and ck[0]["step_number"] == 3, ck
    name = job["fine_tuned_model"]
    dirs = sorted(p.name for p in (ft_server.adapter_dir / name).iterdir() if p.name.startswith("checkpoint-"))
    assert dirs == ["checkpoint-3"], dirs


def test_disk_quota_refuses_a_job_that_would_not_fit(tmp_path):
    adir = tmp_path / "adapters"
    adir.mkdir()
    srv = start_server(tmp_path, adir, args=["--served-model-name", "smollm2", "--ft-disk-quota-mb", "1"])
    try:
        status, f = upload(srv, TINY)
        status, body = create_job(srv, f["id"])  # rank 8 on q,v: ~1.8 MiB of adapter
        assert status == 400, body
        msg = body["error"]["message"]
        assert "--ft-disk-quota-mb 1" in msg, msg
        assert str(tmp_path) not in msg
        # a prompt-tuning job of 20 rows (45 KiB) fits
        status, body = create_job(srv, f["id"], method={"type": "prompt_tuning"}, hyperparameters={"n_epochs": 1})
        assert status == 200, body
    finally:
        assert srv.stop() == 0


def test_budget_flag_bounds_the_adapter(tmp_path):
    adir = tmp_path / "adapters"
    adir.mkdir()
    srv = start_server(tmp_path, adir, args=["--served-model-name", "smollm2", "--adapter-budget-mb", "1"])
    try:
        status, f = upload(srv, TINY)
        status, body = create_job(srv, f["id"], hyperparameters={"rank": 8})  # ~1.8 MiB > 1 MiB
        assert status == 400 and "--adapter-budget-mb 1 MiB" in body["error"]["message"], body
        status, body = create_job(srv, f["id"], hyperparameters={"rank": 2, "n_epochs": 1})  # ~0.45 MiB
        assert status == 200, body
        assert wait_job(srv, body["id"], timeout=120)["status"] == "succeeded"
    finally:
        assert srv.stop() == 0


def test_help_documents_the_limits():
    import subprocess
    from conftest import BINARY
    out = subprocess.run([str(BINARY), "serve", "--help"], capture_output=True, text=True, timeout=10).stdout
    for flag in ("--ft-max-epochs", "--ft-disk-quota-mb", "--ft-keep-checkpoints"):
        assert flag in out


def test_finished_jobs_give_their_memory_back(tmp_path):
    """Each job's training buffers (tens of MiB) are freed when it ends; glibc kept them before
    (src/cli/serve.c fix_mmap_threshold): three small jobs raised RSS by ~240 MiB, now by ~1 MiB."""
    adir = tmp_path / "adapters"
    adir.mkdir()
    srv = start_server(tmp_path, adir, args=["--served-model-name", "smollm2"])
    try:
        rows = jsonl([{"prompt": f"{i}+{i}=", "completion": f" {2 * i}"} for i in range(6)])
        after = []
        for k, method in enumerate(({"type": "lora", "lora": {"hyperparameters": {"n_epochs": 2, "batch_size": 3, "rank": 2}}},
                                    {"type": "prompt_tuning", "prompt_tuning": {"hyperparameters": {"n_epochs": 1, "num_virtual_tokens": 4}}},
                                    {"type": "lora", "lora": {"hyperparameters": {"n_epochs": 2, "batch_size": 3, "rank": 2}}})):
            status, f = upload(srv, rows)
            status, job = create_job(srv, f["id"], suffix=f"mem{k}", method=method)
            assert status == 200, job
            assert wait_job(srv, job["id"], timeout=300)["status"] == "succeeded"
            after.append(rss_kib(srv.proc.pid))
        assert after[-1] - after[0] < 48 << 10, after  # KiB
    finally:
        assert srv.stop() == 0
