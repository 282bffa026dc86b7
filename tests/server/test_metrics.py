"""/metrics: valid Prometheus text that prometheus_client parses, with counters that agree with
what the test sent."""
import json
import math

from prometheus_client.parser import text_string_to_metric_families

from conftest import wait_idle


def scrape(server):
    status, body = server.get("/metrics")
    assert status == 200
    return body.decode()


def samples(text):
    """{(sample name, frozenset(labels)): value} and the families by name."""
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    out = {}
    for f in fams.values():
        for s in f.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out, fams


def value(smp, name, **labels):
    """Sum of the samples called `name` whose labels include `labels`."""
    return sum(v for (n, lbl), v in smp.items() if n == name and set(labels.items()) <= set(lbl))


def test_exposition_format(server):
    status, headers = None, None
    import urllib.request
    with urllib.request.urlopen(server.url + "/metrics", timeout=5) as r:
        status, ctype, text = r.status, r.headers["Content-Type"], r.read().decode()
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    # Every metric has one HELP and one TYPE line, before its samples.
    helps = [l.split()[2] for l in text.splitlines() if l.startswith("# HELP ")]
    types = [l.split()[2] for l in text.splitlines() if l.startswith("# TYPE ")]
    assert len(helps) == len(set(helps)) and helps == types
    _, fams = samples(text)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:cache_config_info", "vllm:lora_requests_info", "deltaserve_adapters_loaded",
                 "deltaserve_adapter_resident"):
        assert fams[name].type == "gauge", name
    for name in ("vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                 "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds",
                 "deltaserve_adapter_load_seconds"):
        assert fams[name].type == "histogram", name
    # prometheus_client names counter families without "_total".
    for name in ("vllm:prompt_tokens", "vllm:generation_tokens", "vllm:request_success", "vllm:num_preemptions",
                 "deltaserve_requests", "deltaserve_adapter_requests"):
        assert fams[name].type == "counter", name


def test_gauges(server):
    smp, fams = samples(scrape(server))
    usage = value(smp, "vllm:kv_cache_usage_perc")
    assert 0.0 <= usage <= 1.0
    cfg = fams["vllm:cache_config_info"].samples[0]
    assert cfg.value == 1 and int(cfg.labels["block_size"]) > 0 and int(cfg.labels["num_gpu_blocks"]) > 0
    lora = fams["vllm:lora_requests_info"].samples
    assert len(lora) == 1 and int(lora[0].labels["max_lora"]) > 0
    assert " " not in lora[0].labels["running_lora_adapters"] + lora[0].labels["waiting_lora_adapters"]
    assert lora[0].value > 1.6e9  # a unix timestamp
    assert value(smp, "deltaserve_adapters_loaded") >= 8


def test_histograms_are_cumulative(server):
    server.post("/v1/completions", {"model": "smollm2", "prompt": "Hi", "max_tokens": 3})
    _, fams = samples(scrape(server))
    for name in ("vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds",
                 "vllm:inter_token_latency_seconds"):
        ss = fams[name].samples
        buckets = [(float(s.labels["le"]), s.value) for s in ss if s.name.endswith("_bucket")]
        count = [s.value for s in ss if s.name.endswith("_count")][0]
        total = [s.value for s in ss if s.name.endswith("_sum")][0]
        les = [b[0] for b in buckets]
        assert les == sorted(les) and math.isinf(les[-1])
        assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:]))
        assert buckets[-1][1] == count > 0 and total > 0


def test_counters_follow_requests(server):
    wait_idle(server)
    before, _ = samples(scrape(server))
    status, body = server.post("/v1/completions", {"model": "lora2", "prompt": "1, 2, 3,", "max_tokens": 5,
                                                   "temperature": 0, "ignore_eos": True})
    assert status == 200
    usage = json.loads(body)["usage"]
    status, body = server.post("/v1/chat/completions", {"model": "smollm2", "max_tokens": 2,
                                                        "messages": [{"role": "user", "content": "Hi"}]})
    assert status == 200
    usage2 = json.loads(body)["usage"]
    assert server.post("/v1/completions", {"model": "smollm2", "prompt": "x", "temperature": 9})[0] == 400
    after, _ = samples(scrape(server))

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("vllm:prompt_tokens_total") == usage["prompt_tokens"] + usage2["prompt_tokens"]
    assert delta("vllm:generation_tokens_total") == usage["completion_tokens"] + usage2["completion_tokens"]
    assert delta("deltaserve_requests_total", endpoint="/v1/completions", status="200") == 1
    assert delta("deltaserve_requests_total", endpoint="/v1/completions", status="400") == 1
    assert delta("deltaserve_requests_total", endpoint="/v1/chat/completions", status="200") == 1
    assert delta("deltaserve_requests_total", endpoint="/metrics", status="200") == 1
    assert delta("deltaserve_adapter_requests_total", adapter="lora2") == 1
    assert delta("vllm:request_success_total", finished_reason="length") + \
        delta("vllm:request_success_total", finished_reason="stop") == 2
    assert delta("vllm:e2e_request_latency_seconds_count") == 2
    assert delta("vllm:time_to_first_token_seconds_count") == 2


def test_adapter_load_metrics(server):
    before, _ = samples(scrape(server))
    assert server.post("/v1/load_lora_adapter", {"lora_name": "m1", "lora_path": "lora1"})[0] == 200
    assert server.post("/v1/load_lora_adapter", {"lora_name": "m1", "lora_path": "lora2", "load_inplace": True})[0] == 200
    after, _ = samples(scrape(server))
    assert value(after, "deltaserve_adapter_load_seconds_count") - value(before, "deltaserve_adapter_load_seconds_count") == 2
    assert value(after, "deltaserve_adapter_version", adapter="m1") == 2
    assert value(after, "deltaserve_adapters_loaded") == value(before, "deltaserve_adapters_loaded") + 1
    assert server.post("/v1/unload_lora_adapter", {"lora_name": "m1"})[0] == 200
