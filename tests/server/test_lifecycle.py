"""Process life cycle: graceful SIGTERM (drain, then cancel), the API key, start-up errors, --help."""
import json
import signal
import subprocess
import time
import urllib.error

import pytest

from conftest import BINARY, MODEL, http_get
from test_adapters import Stream


def test_sigterm_lets_running_stream_finish(fresh_server):
    srv = fresh_server()
    s = Stream(srv, "lora1", 400)  # long enough to outlast the checks below (decode is ~7 ms/token)
    s.start()
    assert s.started.wait(60)
    srv.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    # Draining: unhealthy for load balancers, new work refused, the stream still runs.
    status, body = http_get(srv.url + "/health")
    assert status == 503 and json.loads(body)["status"] == "draining"
    status, body = srv.post("/v1/completions", {"model": "smollm2", "prompt": "x", "max_tokens": 1})
    assert status == 503 and json.loads(body)["error"]["type"] == "server_error"
    s.join(120)
    assert s.error is None, s.error
    assert s.result[1:] == ("length", 400)
    assert srv.proc.wait(30) == 0
    assert "all requests finished" in srv.log()


def test_sigterm_cancels_after_shutdown_timeout(fresh_server):
    srv = fresh_server(["--shutdown-timeout", "1"])
    s = Stream(srv, "smollm2", 2000)  # far longer than the timeout on a CPU
    s.start()
    assert s.started.wait(60)
    t0 = time.time()
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(30) == 0
    assert time.time() - t0 < 10
    s.join(30)
    # The stream was ended properly: an error event saying why, then [DONE].
    assert s.error is None, s.error
    assert len(s.errors) == 1 and "shutting down" in s.errors[0]["message"], s.events[-3:]
    assert s.result[2] is None  # no usage chunk after an error
    assert "cancelling" in srv.log()


def test_api_key(fresh_server):
    srv = fresh_server(api_key="sekret")
    assert http_get(srv.url + "/health")[0] == 200  # public
    for path in ("/v1/models", "/metrics", "/v1/adapters"):
        assert http_get(srv.url + path)[0] == 401, path
        assert http_get(srv.url + path, headers={"Authorization": "Bearer wrong"})[0] == 401, path
        assert srv.get(path)[0] == 200, path
    status, body = http_get(srv.url + "/v1/models")
    assert json.loads(body)["error"]["code"] == "invalid_api_key"
    openai = pytest.importorskip("openai")
    good = openai.OpenAI(base_url=srv.url + "/v1", api_key="sekret", max_retries=0)
    bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0)
    assert good.completions.create(model="smollm2", prompt="Hi", max_tokens=1).usage.completion_tokens == 1
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="smollm2", prompt="Hi", max_tokens=1)
    with pytest.raises(openai.AuthenticationError):
        bad.post("/load_lora_adapter", body={"lora_name": "x", "lora_path": "lora0"}, cast_to=object)
    assert srv.stop() == 0


def test_api_key_from_env(fresh_server):
    srv = fresh_server(env={"DS_API_KEY": "envkey"})
    assert http_get(srv.url + "/v1/models")[0] == 401
    assert http_get(srv.url + "/v1/models", headers={"Authorization": "Bearer envkey"})[0] == 200
    assert srv.stop() == 0


def _environ(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        return dict(e.split(b"=", 1) for e in f.read().split(b"\0") if b"=" in e)


def test_openmp_short_spin(fresh_server):
    """src/backend/cpu/cpu_env.c: without a user setting the server runs (the same pid, re-executed) with
    GOMP_SPINCOUNT=1000; a user's own setting is kept."""
    import os
    user = os.environ.get("GOMP_SPINCOUNT") or ("(policy)" if os.environ.get("OMP_WAIT_POLICY") else None)
    srv = fresh_server()
    got = _environ(srv.proc.pid).get(b"GOMP_SPINCOUNT")
    if user is None:
        assert got == b"1000"
    elif user != "(policy)":
        assert got == user.encode()
    assert srv.stop() == 0
    srv = fresh_server(env={"GOMP_SPINCOUNT": "7", "OPENBLAS_CORETYPE": "Prescott"})
    env = _environ(srv.proc.pid)
    assert env.get(b"GOMP_SPINCOUNT") == b"7"
    assert env.get(b"OPENBLAS_CORETYPE") == b"Prescott"  # the user's kernel choice is kept too
    assert srv.stop() == 0


def test_port_in_use(fresh_server, tmp_path):
    srv = fresh_server()
    out = subprocess.run([str(BINARY), "serve", "-m", str(MODEL), "--port", str(srv.port), "--threads", "1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "address already in use" in out.stderr.lower() and str(srv.port) in out.stderr
    assert srv.stop() == 0


def test_help_and_bad_flags():
    if not BINARY.is_file():
        pytest.skip(f"deltaserve binary not found at {BINARY}")
    out = subprocess.run([str(BINARY), "serve", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for flag in ("--model", "--host", "--port", "--served-model-name", "--adapter-dir", "--api-key",
                 "--max-batch-tokens", "--max-seqs", "--kv-cache-mb", "--max-model-len", "--max-queue",
                 "--max-adapters", "--adapter-budget-mb", "--threads", "--max-body-mb", "--max-connections",
                 "--shutdown-timeout", "--log-level", "DS_API_KEY"):
        assert flag in out.stdout, flag
    bad = subprocess.run([str(BINARY), "serve", "--port", "99999"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--port" in bad.stderr
    bad = subprocess.run([str(BINARY), "serve", "--frobnicate"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--frobnicate" in bad.stderr


def test_queue_full_429(fresh_server):
    srv = fresh_server(["--max-seqs", "1", "--max-queue", "1"])
    running = Stream(srv, "smollm2", 1000)  # occupies the only sequence slot for seconds
    running.start()
    assert running.started.wait(60)
    waiting = Stream(srv, "smollm2", 2)   # fills the queue
    waiting.start()
    time.sleep(0.3)
    import urllib.request
    req = urllib.request.Request(srv.url + "/v1/completions", method="POST",
                                 data=json.dumps({"model": "smollm2", "prompt": "x", "max_tokens": 1}).encode())
    try:
        urllib.request.urlopen(req, timeout=30)
        pytest.fail("expected 429")
    except urllib.error.HTTPError as e:
        assert e.code == 429 and e.headers["Retry-After"] == "1"
        assert json.loads(e.read())["error"]["type"] == "rate_limit_error"
    running.join(120)
    waiting.join(120)
    assert running.error is None and waiting.error is None
    assert srv.stop() == 0
