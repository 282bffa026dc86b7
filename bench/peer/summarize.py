#!/usr/bin/env python3
"""Markdown tables with deltaserve/llama.cpp ratios from a bench/peer run directory.

    bench/peer/summarize.py bench/results/quant-<stamp>          (bench/peer/quant_bench.sh)
    bench/peer/summarize.py bench/results/serving-peer-<stamp>   (bench/peer/serving_peer.sh)

Standard library only. A ratio > 1 means deltaserve is faster (throughput) or, for memory and
TPOT, larger/slower: every ratio is deltaserve's number over llama.cpp's."""
import glob
import json
import os
import re
import sys


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def time_rss_mb(path):
    """Peak RSS in MB from a GNU time -f '%M kB max RSS, ...' file."""
    try:
        m = re.search(r"(\d+) kB max RSS", open(path).read())
        return int(m.group(1)) / 1024 if m else None
    except OSError:
        return None


def ratio(a, b):
    return f"{a / b:.2f}" if a and b else "–"


def num(x, fmt="{:.1f}"):
    return fmt.format(x) if isinstance(x, (int, float)) and x is not None else "–"


def llama_bench(rows):
    """(pp t/s, pp sd, tg t/s, tg sd, model bytes) from llama-bench's JSON list."""
    pp = tg = (None, None)
    size = None
    for x in rows or []:
        size = x.get("model_size", size)
        if x.get("n_prompt", 0) > 0 and x.get("n_gen", 0) == 0:
            pp = (x.get("avg_ts"), x.get("stddev_ts"))
        elif x.get("n_gen", 0) > 0 and x.get("n_prompt", 0) == 0:
            tg = (x.get("avg_ts"), x.get("stddev_ts"))
    return pp, tg, size


def quant(d):
    meta = load(os.path.join(d, "meta.json")) or {}
    print(f"### {os.path.basename(d.rstrip('/'))}\n")
    print(f"{meta.get('cpu', '?')}, {meta.get('cores', '?')} cores; threads {meta.get('threads', '?')}; "
          f"pp{meta.get('n_prompt', '?')} / tg{meta.get('n_gen', '?')}, {meta.get('reps', '?')} reps; "
          f"deltaserve {str(meta.get('commit', '?'))[:10]}{' (dirty)' if meta.get('dirty') else ''}; "
          f"llama.cpp: {meta.get('llamacpp', '?')}\n")
    print("| model | neighbour | deltaserve activations | file MB | pp llama.cpp t/s | pp deltaserve t/s | pp ratio | tg llama.cpp t/s "
          "| tg deltaserve t/s | tg ratio | peak RSS llama.cpp MB | RSS after load deltaserve MB "
          "| peak RSS deltaserve MB | RSS ratio |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    runs = set()
    for path in glob.glob(os.path.join(d, "deltaserve*-*.json")) + glob.glob(os.path.join(d, "llamacpp-*.json")):
        m = re.match(r"(deltaserve8?|llamacpp)-(.*)-(quiet|neighbour)\.json$", os.path.basename(path))
        if m:
            runs.add((m.group(2), m.group(3)))
    order = {"quiet": 0, "neighbour": 1}
    for stem, cond in sorted(runs, key=lambda k: (k[0], order[k[1]])):
        lc = load(os.path.join(d, f"llamacpp-{stem}-{cond}.json"))
        (lpp, lpp_sd), (ltg, ltg_sd), size = llama_bench(lc)
        l_rss = time_rss_mb(os.path.join(d, f"llamacpp-{stem}-{cond}.time"))
        for prefix, mode in (("deltaserve", "fp32 (exact)"), ("deltaserve8", "int8")):
            ds = load(os.path.join(d, f"{prefix}-{stem}-{cond}.json"))
            if ds is None and prefix == "deltaserve8":
                continue
            ds = ds or {}
            dpp, dtg = ds.get("pp_tps"), ds.get("tg_tps")
            d_rss = time_rss_mb(os.path.join(d, f"{prefix}-{stem}-{cond}.time"))
            if d_rss is None and ds.get("hwm_end_kb"):
                d_rss = ds["hwm_end_kb"] / 1024
            d_load = ds["rss_load_kb"] / 1024 if ds.get("rss_load_kb") else None

            def pm(v, sd):
                return f"{v:.1f} ± {sd:.1f}" if v is not None and sd is not None else num(v)

            print(f"| {stem} | {'yes' if cond == 'neighbour' else 'no'} | {mode} "
                  f"| {num(size / 2**20 if size else None, '{:.0f}')} "
                  f"| {pm(lpp, lpp_sd)} | {pm(dpp, ds.get('pp_tps_sd'))} | {ratio(dpp, lpp)} "
                  f"| {pm(ltg, ltg_sd)} | {pm(dtg, ds.get('tg_tps_sd'))} | {ratio(dtg, ltg)} "
                  f"| {num(l_rss, '{:.0f}')} | {num(d_load, '{:.0f}')} | {num(d_rss, '{:.0f}')} | {ratio(d_rss, l_rss)} |")
    print()
    print("Ratios are deltaserve / llama.cpp. Peak RSS is the whole process's (GNU time %M); both map the "
          "GGUF, whose pages count once touched (llama.cpp also repacks some types into its own buffers). "
          "deltaserve's after-load RSS is VmRSS once ds_llama (KV pool, activations) is ready, before the "
          "first forward pass touches most weight pages.")


def serving(d):
    meta = load(os.path.join(d, "meta.json")) or {}
    print(f"### {os.path.basename(d.rstrip('/'))}\n")
    print(f"{meta.get('cpu', '?')}, {meta.get('cores', '?')} cores; threads {meta.get('threads', '?')}; "
          f"model {meta.get('model', '?')}; deltaserve {str(meta.get('commit', '?'))[:10]}; "
          f"llama.cpp: {meta.get('llamacpp', '?')}\n")
    res = {}  # (scenario, round) -> {server: json}
    rss = {}
    for path in glob.glob(os.path.join(d, "*-r*-*.json")):
        m = re.match(r"(deltaserve|llamacpp)-r(\d+)-(.*)\.json$", os.path.basename(path))
        if m:
            res.setdefault((m.group(3), int(m.group(2))), {})[m.group(1)] = load(path) or {}
    for path in glob.glob(os.path.join(d, "*-r*.rss")):
        m = re.match(r"(deltaserve|llamacpp)-r(\d+)\.rss$", os.path.basename(path))
        if m:
            rss[(m.group(1), int(m.group(2)))] = open(path).read().split()
    print("| scenario | round | metric | llama.cpp | deltaserve | ratio | failed (l / d) |")
    print("|---|---:|---|---:|---:|---:|---|")
    metric = {"single": ("mean_tpot_ms", "mean TPOT ms"), "base8": ("output_throughput", "output tok/s"),
              "lora8": ("output_throughput", "output tok/s")}
    for (sc, rnd) in sorted(res, key=lambda k: (list(metric).index(k[0]) if k[0] in metric else 9, k[1])):
        key, label = metric.get(sc, ("output_throughput", "output tok/s"))
        l, ds = res[(sc, rnd)].get("llamacpp", {}), res[(sc, rnd)].get("deltaserve", {})
        print(f"| {sc} | {rnd} | {label} | {num(l.get(key))} | {num(ds.get(key))} | {ratio(ds.get(key), l.get(key))} "
              f"| {l.get('failed', '–')} / {ds.get('failed', '–')} |")
    for rnd in sorted({k[1] for k in rss}):
        l, ds = rss.get(("llamacpp", rnd)), rss.get(("deltaserve", rnd))

        def mb(v, i):
            return int(v[i]) / 1024 if v and len(v) > i else None

        for i, what in ((0, "VmRSS after start MB"), (1, "VmHWM at end MB")):
            print(f"| memory | {rnd} | {what} | {num(mb(l, i), '{:.0f}')} | {num(mb(ds, i), '{:.0f}')} "
                  f"| {ratio(mb(ds, i), mb(l, i))} | |")
    print()
    print("single: one client, mean TPOT (lower is better, so a ratio > 1 means deltaserve is slower); "
          "base8: 8 clients, base model; lora8: 8 clients spread round-robin over 8 LoRA adapters.")


def main():
    if len(sys.argv) != 2 or not os.path.isdir(sys.argv[1]):
        sys.exit(__doc__)
    d = sys.argv[1]
    if glob.glob(os.path.join(d, "*-quiet.json")) or glob.glob(os.path.join(d, "*-neighbour.json")):
        quant(d)
    elif glob.glob(os.path.join(d, "*-r*-*.json")):
        serving(d)
    else:
        sys.exit(f"{d}: no quant_bench or serving_peer results")


if __name__ == "__main__":
    main()
