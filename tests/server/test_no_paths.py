"""No absolute server path in any error (issue 14, item 10): adapter loads that fail in every way a
directory can be wrong, /v1/adapters/{name}/train, fine-tuning jobs that fail on the adapter
directory, and file uploads. The server is started with its adapter directory given through a
symlink, so that both the path as given and its real path would show in a leak."""
import json
import os
import re
import shutil

import pytest

from conftest import create_job, jsonl, start_server, upload, wait_job
from peft_gen import make_lora

# an absolute filesystem path: '/' after start, space, quote, '(' or ':' and a name with another '/'
ABS = re.compile(r"""(?:^|[\s'"(:=])/(?!v1/)[^\s'"/]+/""")


@pytest.fixture(scope="module")
def np_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nopath")
    real = tmp / "real-adapters"
    real.mkdir()
    make_lora(real / "good", seed=1)
    link = tmp / "adapters"
    os.symlink(real, link)
    srv = start_server(tmp, link, args=["--served-model-name", "smollm2"])
    srv.tmp, srv.real = tmp, real
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]


def check(srv, status, raw, want_status=None):
    text = raw.decode() if isinstance(raw, bytes) else raw
    if want_status is not None:
        assert status == want_status, text
    assert status >= 400, text
    msg = json.loads(text)["error"]["message"]
    assert str(srv.tmp) not in msg and not ABS.search(msg), msg
    return msg


def load(srv, name, path):
    return srv.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": path}, timeout=30)


def test_adapter_load_errors_name_no_path(np_server):
    s, real = np_server, np_server.real
    (real / "empty").mkdir()
    (real / "badcfg").mkdir()
    (real / "badcfg" / "adapter_config.json").write_text("{not json")
    shutil.copytree(real / "good", real / "badst")
    (real / "badst" / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    shutil.copytree(real / "good", real / "nost")
    os.remove(real / "nost" / "adapter_model.safetensors")
    (real / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    outside = np_server.tmp / "outside"
    shutil.copytree(real / "good", outside)
    os.symlink(outside, real / "escape")
    (real / "half").mkdir()
    os.symlink(outside / "adapter_config.json", real / "half" / "adapter_config.json")
    shutil.copy(real / "good" / "adapter_model.safetensors", real / "half")
    for path in ("missing", "empty", "badcfg", "badst", "nost", "bad.gguf", "escape", "half", "../outside",
                 str(outside), str(real / "missing"), "good/adapter_config.json"):
        status, raw = load(s, "x", path)
        check(s, status, raw)
    assert load(s, "ok", "good")[0] == 200


def test_train_endpoint_errors_name_no_path(np_server):
    s = np_server
    status, raw = s.post("/v1/adapters/nope/train", {"examples": [{"prompt": "a", "completion": "b"}]})
    check(s, status, raw)
    assert load(s, "tgood", "good")[0] == 200
    # the adapter's directory replaced by a file: the update cannot be written there
    shutil.rmtree(s.real / "good")
    (s.real / "good").write_text("not a directory")
    try:
        status, raw = s.post("/v1/adapters/tgood/train", {"examples": [{"prompt": "a", "completion": "b"}],
                                                         "n_epochs": 1}, timeout=120)
        if status != 200:
            check(s, status, raw)
    finally:
        os.remove(s.real / "good")
        make_lora(s.real / "good", seed=1)


def test_failed_job_names_no_path(np_server):
    s = np_server
    (s.real / "ft-clash").write_text("a file where the job's adapter directory would go")
    status, f = upload(s, jsonl([{"prompt": "2+2=", "completion": " 4"}]))
    assert status == 200, f
    status, job = create_job(s, f["id"], suffix="clash", hyperparameters={"n_epochs": 1, "rank": 1})
    assert status == 200, job
    job = wait_job(s, job["id"], timeout=120)
    assert job["status"] == "failed", job
    msg = job["error"]["message"]
    assert msg and str(s.tmp) not in msg and not ABS.search(msg), msg
    status, raw = s.get(f"/v1/fine_tuning/jobs/{job['id']}/events")
    for e in json.loads(raw)["data"]:
        assert str(s.tmp) not in e["message"] and not ABS.search(e["message"]), e
