"""Soak driver for bench/soak.sh (issue 14): adapter churn (load / replace / unload over both the
vLLM and the REST endpoints), fine-tuning jobs, and mixed clients (completions and chat, streaming
and not, several adapters and the base, mid-stream disconnects) against one running server for
--seconds. Writes summary.json: requests, statuses, non-2xx by status, unexpected 5xx, the server's
RSS over time (start / middle / end), and the gauges of /metrics once the load stopped.

Expected non-2xx: 404 / 409 for a request or unload that raced an unload or a replace, 400 for a
load into a name that was just loaded again, 429 when the queue is full. Every 5xx is unexpected."""
import argparse
import http.client
import json
import random
import socket
import threading
import time
from collections import Counter

LOCK = threading.Lock()
STATUS = Counter()        # (kind, status) -> n
NON2XX = Counter()        # status -> n
UNEXPECTED = []           # (kind, status, body head)
RSS = []                  # (t, KiB)
COUNTS = Counter()


def record(kind, status, body=b""):
    with LOCK:
        STATUS[(kind, status)] += 1
        COUNTS[kind] += 1
        if not 200 <= status < 300:
            NON2XX[status] += 1
        if status >= 500 or status == 0:
            UNEXPECTED.append((kind, status, body[:200].decode("utf-8", "replace")))


def request(port, method, path, body=None, timeout=120, headers=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        h = {"Content-Type": "application/json", **(headers or {})}
        c.request(method, path, body=data, headers=h)
        r = c.getresponse()
        return r.status, r.read()
    except (OSError, http.client.HTTPException) as e:
        return 0, str(e).encode()
    finally:
        c.close()


def rss_kib(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def churn(a, stop, rng):
    """Loads, replaces and unloads the churn-* adapters (copies of the pool) through both APIs."""
    names = [f"churn{i}" for i in range(a.churn_names)]
    while not stop.is_set():
        name, src = rng.choice(names), rng.choice(a.pool)
        op = rng.random()
        if op < 0.35:
            st, b = request(a.port, "POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": src})
            record("load", st, b)
        elif op < 0.6:
            st, b = request(a.port, "POST", "/v1/adapters", {"id": name, "path": src, "replace": True})
            record("replace", st, b)
        elif op < 0.85:
            st, b = request(a.port, "POST", "/v1/unload_lora_adapter", {"lora_name": name})
            record("unload", st, b)
        else:
            st, b = request(a.port, "DELETE", f"/v1/adapters/{name}")
            record("unload", st, b)
        stop.wait(rng.uniform(0.05, 0.4))


def finetune(a, stop, rng):
    """Small LoRA / prompt-tuning jobs, one after another; each adapter it publishes is unloaded."""
    rows = [{"prompt": f"{i}+{i}=", "completion": f" {2 * i}"} for i in range(6)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    k = 0
    while not stop.is_set():
        st, b = request(a.port, "POST", "/v1/files", {"filename": "soak.jsonl", "purpose": "fine-tune", "content": text})
        record("file", st, b)
        if st != 200:
            stop.wait(5)
            continue
        fid = json.loads(b)["id"]
        k += 1
        method = {"type": "lora", "lora": {"hyperparameters": {"n_epochs": 2, "batch_size": 3, "rank": rng.choice([1, 2, 4])}}}
        if k % 3 == 0:
            method = {"type": "prompt_tuning", "prompt_tuning": {"hyperparameters": {"n_epochs": 1, "num_virtual_tokens": 4}}}
        st, b = request(a.port, "POST", "/v1/fine_tuning/jobs",
                        {"model": a.model, "training_file": fid, "suffix": f"soak{k % 4}", "method": method})
        record("ft_create", st, b)
        if st != 200:
            stop.wait(5)
            continue
        jid = json.loads(b)["id"]
        while not stop.is_set():
            st, b = request(a.port, "GET", f"/v1/fine_tuning/jobs/{jid}")
            record("ft_get", st, b)
            status = json.loads(b).get("status") if st == 200 else None
            if status in ("succeeded", "failed", "cancelled"):
                with LOCK:
                    COUNTS[f"ft_{status}"] += 1
                if status == "succeeded":
                    st, b = request(a.port, "POST", "/v1/unload_lora_adapter", {"lora_name": f"ft-soak{k % 4}"})
                    record("unload", st, b)
                break
            stop.wait(1)
        if stop.is_set():
            request(a.port, "POST", f"/v1/fine_tuning/jobs/{jid}/cancel")
        request(a.port, "DELETE", f"/v1/files/{fid}")


def stream_and_maybe_drop(a, path, body, drop):
    """A streaming request; drop=True closes the socket after the first event."""
    s = socket.create_connection(("127.0.0.1", a.port), timeout=120)
    try:
        data = json.dumps(body).encode()
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(4096)
            if not chunk:
                return 0, buf
            buf += chunk
        status = int(buf.split(b" ", 2)[1])
        if drop and status == 200:
            return status, b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
        if status == 200 and b"data: [DONE]" not in buf:
            return 0, b"stream ended without [DONE]"
        return status, buf.split(b"\r\n\r\n", 1)[1]
    except OSError as e:
        return 0, str(e).encode()
    finally:
        s.close()


def client(a, stop, rng):
    models = [a.model] + a.stable + [f"churn{i}" for i in range(a.churn_names)]
    while not stop.is_set():
        model = rng.choice(models)
        chat = rng.random() < 0.5
        stream = rng.random() < 0.5
        path = "/v1/chat/completions" if chat else "/v1/completions"
        body = {"model": model, "max_tokens": rng.randint(1, 24), "temperature": rng.choice([0, 0.7]),
                "stream": stream}
        if chat:
            body["messages"] = [{"role": "user", "content": rng.choice(["Hi!", "What is 2+2?", "Name a colour."])}]
        else:
            body["prompt"] = rng.choice(["The capital of France is", "Once upon a time", "1, 2, 3,"])
            if rng.random() < 0.2:
                body["n"] = 2
        kind = ("chat" if chat else "completion") + ("_stream" if stream else "")
        if stream:
            drop = rng.random() < 0.25
            st, b = stream_and_maybe_drop(a, path, body, drop)
            if drop and st == 200:
                kind += "_dropped"
        else:
            st, b = request(a.port, "POST", path, body)
        record(kind, st, b)


def sampler(a, stop, t0):
    while not stop.is_set():
        with LOCK:
            RSS.append((round(time.time() - t0, 1), rss_kib(a.pid)))
        stop.wait(5)


def gauges(port):
    st, b = request(port, "GET", "/metrics")
    out = {}
    for line in b.decode(errors="replace").splitlines():
        if line.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                            "deltaserve_adapter_resident")):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--seconds", type=float, default=900)
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--pool", default="", help="comma-separated adapter paths to churn")
    p.add_argument("--stable", default="", help="comma-separated adapter names always loaded")
    p.add_argument("--churn-names", type=int, default=6)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()
    a.pool = [x for x in a.pool.split(",") if x]
    a.stable = [x for x in a.stable.split(",") if x]
    stop = threading.Event()
    t0 = time.time()
    threads = [threading.Thread(target=sampler, args=(a, stop, t0))]
    threads += [threading.Thread(target=churn, args=(a, stop, random.Random(a.seed)))]
    threads += [threading.Thread(target=finetune, args=(a, stop, random.Random(a.seed + 1)))]
    threads += [threading.Thread(target=client, args=(a, stop, random.Random(a.seed + 10 + i)))
                for i in range(a.clients)]
    for t in threads:
        t.start()
    time.sleep(a.seconds)
    stop.set()
    for t in threads:
        t.join(timeout=300)
    # the server must come back to idle: running / waiting gauges 0
    g = {}
    for _ in range(60):
        g = gauges(a.port)
        if not g.get("vllm:num_requests_running", 1) and not g.get("vllm:num_requests_waiting", 1):
            break
        time.sleep(1)
    rss = RSS or [(0, 0)]
    # start: after the first minute (the allocator and caches have warmed up); also the very first sample
    warm = [r for r in rss if r[0] >= 60] or rss
    start, middle, end = warm[0], warm[len(warm) // 2], (round(time.time() - t0, 1), rss_kib(a.pid))
    summary = {
        "seconds": round(time.time() - t0, 1), "clients": a.clients,
        "requests": sum(COUNTS[k] for k in COUNTS if not k.startswith("ft_") or k in ("ft_create", "ft_get")),
        "by_kind": dict(sorted(COUNTS.items())),
        "status_by_kind": {f"{k} {s}": n for (k, s), n in sorted(STATUS.items())},
        "non_2xx_by_status": {str(k): v for k, v in sorted(NON2XX.items())},
        "unexpected_5xx_or_transport": len(UNEXPECTED), "unexpected_examples": UNEXPECTED[:20],
        "rss_kib": {"first_sample": rss[0], "start": start, "middle": middle, "end": end,
                    "max": max(r[1] for r in rss)},
        "rss_growth_start_to_end": round((end[1] - start[1]) / start[1], 4) if start[1] else None,
        "gauges_after": g,
    }
    with open(a.out, "w") as f:
        json.dump(summary, f, indent=1)
    with open(a.out.replace(".json", "-rss.json"), "w") as f:
        json.dump(rss, f)
    print(json.dumps({k: summary[k] for k in ("seconds", "requests", "non_2xx_by_status", "unexpected_5xx_or_transport",
                                              "rss_growth_start_to_end", "gauges_after")}))


if __name__ == "__main__":
    main()
