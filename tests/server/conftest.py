"""Fixtures for the server tests: they start the real `deltaserve serve` binary on a free loopback
port and talk to it over HTTP (the openai client, raw sockets, urllib).

Nothing is built here. The binary is $DS_BINARY (default <repo>/build/deltaserve), the model
$DS_MODEL (default <repo>/models/SmolLM2-135M-Instruct.Q4_1.gguf); the tests skip, saying why, when
either is missing. The adapters are made here: 8 small random LoRA adapters for SmolLM2 written as
PEFT directories (peft_gen.py: safetensors written by hand, no numpy/torch), one adapter of every
other PEFT type under kinds/ (loaded at run time by the tests), plus copies of the committed golden
adapters under tests/data/adapters/smollm2/ when there are any.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from peft_gen import KINDS, make_lora

REPO = Path(__file__).resolve().parents[2]
BINARY = Path(os.environ.get("DS_BINARY", REPO / "build" / "deltaserve"))
MODEL = Path(os.environ.get("DS_MODEL", REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
GOLDEN_ADAPTERS = REPO / "tests" / "data" / "adapters" / "smollm2"
THREADS = os.environ.get("DS_TEST_THREADS", "2")

N_ADAPTERS = 8
ADAPTER_NAMES = [f"lora{i}" for i in range(N_ADAPTERS)]


# ---- adapters ----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def adapter_source(tmp_path_factory):
    """A directory of adapters that tests copy from (never served directly)."""
    src = tmp_path_factory.mktemp("adapter-src")
    for i, name in enumerate(ADAPTER_NAMES):
        make_lora(src / name, seed=1000 + i)
    # Other PEFT types, under a sub-directory that the start-up scan does not enter (tests load them
    # at run time with lora_path "kinds/<kind>").
    for i, kind in enumerate(KINDS):
        KINDS[kind](src / "kinds" / kind, 2000 + i)
    golden = []
    if GOLDEN_ADAPTERS.is_dir():
        for d in sorted(GOLDEN_ADAPTERS.iterdir()):
            if (d / "adapter_config.json").is_file():
                shutil.copytree(d, src / f"golden-{d.name}")
                golden.append(f"golden-{d.name}")
    return src, golden


# ---- the server process ------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url, timeout=5.0, headers=None):
    """(status, body bytes); never raises for HTTP errors."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def http_post(url, body, timeout=60.0, headers=None, method="POST"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Server:
    def __init__(self, proc, port, adapter_dir, log_path, api_key=None):
        self.proc, self.port, self.adapter_dir, self.log_path, self.api_key = proc, port, adapter_dir, log_path, api_key
        self.url = f"http://127.0.0.1:{port}"
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def get(self, path, **kw):
        return http_get(self.url + path, headers={**self.headers, **kw.pop("headers", {})}, **kw)

    def post(self, path, body, **kw):
        return http_post(self.url + path, body, headers={**self.headers, **kw.pop("headers", {})}, **kw)

    def log(self):
        return Path(self.log_path).read_text(errors="replace")

    def stop(self, timeout=30):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(tmp_path, adapter_dir=None, args=(), env=None, api_key=None, wait=True, preexec_fn=None):
    if not BINARY.is_file():
        pytest.skip(f"deltaserve binary not found at {BINARY} (build it, or set DS_BINARY)")
    if not MODEL.is_file():
        pytest.skip(f"model not found at {MODEL} (run scripts/fetch_model.sh, or set DS_MODEL)")
    port = free_port()
    log_path = tmp_path / f"server-{port}.log"
    cmd = [str(BINARY), "serve", "-m", str(MODEL), "--port", str(port), "--threads", THREADS, *args]
    if adapter_dir is not None:
        cmd += ["--adapter-dir", str(adapter_dir)]
    if api_key:
        cmd += ["--api-key", api_key]
    full_env = {k: v for k, v in os.environ.items() if k not in ("DS_API_KEY",)}
    full_env.update(env or {})
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, preexec_fn=preexec_fn)
    srv = Server(proc, port, adapter_dir, log_path, api_key)
    if wait:
        wait_healthy(srv)
    return srv


def wait_healthy(srv, timeout=90.0):
    end = time.time() + timeout
    while time.time() < end:
        if srv.proc.poll() is not None:
            pytest.fail(f"deltaserve exited with {srv.proc.returncode} during start-up:\n{srv.log()[-4000:]}")
        try:
            status, _ = http_get(srv.url + "/health", timeout=1.0)
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    srv.stop()
    pytest.fail(f"deltaserve did not become healthy in {timeout} s:\n{srv.log()[-4000:]}")


@pytest.fixture(scope="session")
def server(tmp_path_factory, adapter_source):
    """The shared server: 8 random LoRA adapters (lora0..lora7) + golden ones, small limits so the
    robustness tests run fast."""
    src, golden = adapter_source
    tmp = tmp_path_factory.mktemp("server")
    adir = tmp / "adapters"
    shutil.copytree(src, adir)
    srv = start_server(tmp, adir, args=["--max-seqs", "48", "--max-body-mb", "1", "--header-timeout", "2",
                                        "--served-model-name", "smollm2"])
    srv.golden = golden
    yield srv
    rc = srv.stop()
    assert rc == 0, f"server exited with {rc}:\n{srv.log()[-4000:]}"


@pytest.fixture(scope="session")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
def fresh_server(tmp_path, adapter_source):
    """A private server for tests that stop it (signals) or need other flags; call it."""
    started = []

    def start(args=(), **kw):
        src, _ = adapter_source
        adir = tmp_path / f"adapters{len(started)}"
        shutil.copytree(src, adir)
        srv = start_server(tmp_path, adir, args=["--served-model-name", "smollm2", *args], **kw)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait()


def wait_idle(srv, timeout=30.0):
    """Waits until the engine has no running or waiting request (per /metrics)."""
    from prometheus_client.parser import text_string_to_metric_families
    end = time.time() + timeout
    while time.time() < end:
        _, body = srv.get("/metrics")
        busy = 0.0
        for fam in text_string_to_metric_families(body.decode()):
            if fam.name in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
                busy += sum(s.value for s in fam.samples)
        if busy == 0:
            return
        time.sleep(0.05)
    raise AssertionError("the engine did not become idle")


# Fine-tuning: a private server per test module and the client helpers, shared by test_finetune.py,
# test_ft_limits.py, test_no_paths.py and test_persistence.py.

@pytest.fixture(scope="module")
def ft_server(request, tmp_path_factory):
    """A private server for fine-tuning jobs (a job adds an adapter to its adapter directory and keeps
    the CPU busy), started with the test module's FT_SERVER_ARGS; srv.tmp is its directory."""
    tmp = tmp_path_factory.mktemp("ft")
    adir = tmp / "adapters"
    adir.mkdir()
    srv = start_server(tmp, adir, args=["--served-model-name", "smollm2",
                                        *getattr(request.module, "FT_SERVER_ARGS", ())])
    srv.tmp = tmp
    yield srv
    rc = srv.stop()
    assert rc == 0, f"server exited with {rc}:\n{srv.log()[-4000:]}"


def jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


def upload(srv, content, filename="train.jsonl", purpose="fine-tune"):
    """multipart/form-data upload, built by hand (what curl -F and the openai client send)."""
    boundary = "----deltaserveTestBoundary7MA4YWxk"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/jsonl\r\n\r\n").encode() + content.encode() + f"\r\n--{boundary}--\r\n".encode()
    status, raw = srv.post("/v1/files", body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    return status, json.loads(raw)


def create_job(srv, file_id, **kw):
    body = {"model": "smollm2", "training_file": file_id, **kw}
    status, raw = srv.post("/v1/fine_tuning/jobs", body)
    return status, json.loads(raw)


def get_job(srv, job_id):
    status, raw = srv.get(f"/v1/fine_tuning/jobs/{job_id}")
    assert status == 200, raw
    return json.loads(raw)


def wait_job(srv, job_id, timeout=120.0, until=("succeeded", "failed", "cancelled")):
    end = time.time() + timeout
    while time.time() < end:
        job = get_job(srv, job_id)
        if job["status"] in until:
            return job
        time.sleep(0.25)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s:\n{srv.log()[-3000:]}")


def chat(srv, model, content, max_tokens=12):
    status, raw = srv.post("/v1/chat/completions", {"model": model, "temperature": 0, "max_tokens": max_tokens,
                                                    "messages": [{"role": "user", "content": content}]})
    assert status == 200, raw
    return json.loads(raw)["choices"][0]["message"]["content"]
