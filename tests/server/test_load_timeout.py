"""Adapter loads with a deadline (issue 14): a load stuck on a slow file system is answered 504 after
--adapter-load-timeout, publishes nothing when it finally ends, and holds no shared worker: more
stuck loads than libuv has pool threads leave normal loads, uploads and generation working. The
slow file system is the server's test hook DS_TEST_SLOW_LOAD_S (paths whose last component starts
with "slow" wait that long before reading)."""
import json
import shutil
import threading
import time

from conftest import start_server
from peft_gen import make_lora


def load(srv, name, path, timeout=30):
    t0 = time.time()
    status, raw = srv.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": path}, timeout=timeout)
    return status, raw.decode(), time.time() - t0


def test_a_stuck_load_times_out_and_frees_its_worker(tmp_path):
    adir = tmp_path / "adapters"
    make_lora(adir / "fast", seed=3)
    for i in range(6):
        make_lora(adir / "later" / f"slow{i}", seed=10 + i)
    srv = start_server(tmp_path, adir, args=["--served-model-name", "smollm2", "--adapter-load-timeout", "1"],
                       env={"DS_TEST_SLOW_LOAD_S": "6"})
    try:
        results = [None] * 6

        def slow(i):
            results[i] = load(srv, f"slow{i}", f"later/slow{i}")

        threads = [threading.Thread(target=slow, args=(i,)) for i in range(6)]  # more than libuv's 4 workers
        for t in threads:
            t.start()
        time.sleep(0.3)
        # while they hang: health, a normal load, an upload (a libuv worker) and a completion all answer
        t0 = time.time()
        assert srv.get("/health")[0] == 200
        status, text, secs = load(srv, "fast1", "fast")
        assert status == 200 and secs < 5, (status, text, secs)
        status, raw = srv.post("/v1/files", {"filename": "a.jsonl", "content": '{"prompt":"a","completion":"b"}\n'})
        assert status == 200, raw
        status, raw = srv.post("/v1/completions", {"model": "fast1", "prompt": "Hi", "max_tokens": 2}, timeout=60)
        assert status == 200, raw
        for t in threads:
            t.join(timeout=20)
        for status, text, secs in results:
            assert status == 504, text
            msg = json.loads(text)["error"]["message"]
            assert "--adapter-load-timeout" in msg and "did not finish within 1 s" in msg, msg
            assert secs < 4, secs
        # once the slow reads end, nothing is published
        time.sleep(6.5)
        status, raw = srv.get("/v1/models")
        ids = [m["id"] for m in json.loads(raw)["data"]]
        assert "fast1" in ids and not any(i.startswith("slow") for i in ids), ids
        # and the same names load normally from a fast path
        shutil.copytree(adir / "fast", adir / "again")
        status, text, _ = load(srv, "slow0", "again")
        assert status == 200, text
    finally:
        assert srv.stop() == 0, srv.log()[-3000:]


def test_help_documents_the_load_timeout():
    import subprocess
    from conftest import BINARY
    out = subprocess.run([str(BINARY), "serve", "--help"], capture_output=True, text=True, timeout=10).stdout
    assert "--adapter-load-timeout" in out
