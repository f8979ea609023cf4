"""plan_validate.py: the cost model's predictions against `opt bench` on this machine (issue 5).

Run by bench/plan_validate.sh, which documents the procedure; standard library only.

  plan_validate.py run --opt OPT --probe PROBE --offload-dir DIR --raw RAW.json [--reps N]
      runs the grid (and the planner's picks) and writes every measurement and prediction to RAW
  plan_validate.py report --opt OPT --raw RAW.json --md OUT.md [--probe PROBE]
      recomputes the predictions with OPT (and PROBE, default the one in RAW) and writes the
      markdown section; used after changing the cost model, without measuring again
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

# Two synthetic models: OPT-125m itself and a 409M-parameter shape with OPT-1.3B's width (2048)
# and 6 layers, so that a decode step reads ~0.8 GB of weights. Prompt and generation lengths
# are short so that the whole grid runs in ~15 minutes on 2 vCPUs.
MODELS = {
    "opt-125m": {"shape": "opt-125m", "prompt_len": 64, "gen_len": 16},
    "2048x6x32x8192": {"shape": "2048x6x32x8192", "prompt_len": 32, "gen_len": 8},
}

P = "--percent"
GRID = [
    # model, label, policy flags (as bench and `plan --eval` take them)
    ("opt-125m", "all RAM, 4x2", P + " 0 100 0 100 0 100 --gpu-batch-size 4 --num-gpu-batches 2"),
    ("opt-125m", "all RAM, 1x8", P + " 0 100 0 100 0 100 --gpu-batch-size 1 --num-gpu-batches 8"),
    ("opt-125m", "all RAM, 16x1", P + " 0 100 0 100 0 100 --gpu-batch-size 16 --num-gpu-batches 1"),
    ("opt-125m", "weights 50% disk, 4x2", P + " 0 50 0 100 0 100 --gpu-batch-size 4 --num-gpu-batches 2"),
    ("opt-125m", "weights 100% disk, 4x2", P + " 0 0 0 100 0 100 --gpu-batch-size 4 --num-gpu-batches 2"),
    ("opt-125m", "cache 50% disk, 4x2", P + " 0 100 0 50 0 100 --gpu-batch-size 4 --num-gpu-batches 2"),
    ("opt-125m", "cache 100% disk, 8x2", P + " 0 100 0 0 0 100 --gpu-batch-size 8 --num-gpu-batches 2"),
    ("opt-125m", "activations 100% disk, 4x2", P + " 0 100 0 100 0 0 --gpu-batch-size 4 --num-gpu-batches 2"),
    ("opt-125m", "4-bit weights, 4x2", P + " 0 100 0 100 0 100 --gpu-batch-size 4 --num-gpu-batches 2 --compress-weight"),
    ("opt-125m", "4-bit cache, 4x2", P + " 0 100 0 100 0 100 --gpu-batch-size 4 --num-gpu-batches 2 --compress-cache"),
    ("opt-125m", "4-bit w+c, weights 50% disk, 4x2",
     P + " 0 50 0 100 0 100 --gpu-batch-size 4 --num-gpu-batches 2 --compress-weight --compress-cache"),
    ("2048x6x32x8192", "all RAM, 4x1", P + " 0 100 0 100 0 100 --gpu-batch-size 4 --num-gpu-batches 1"),
    ("2048x6x32x8192", "all RAM, 8x1", P + " 0 100 0 100 0 100 --gpu-batch-size 8 --num-gpu-batches 1"),
    ("2048x6x32x8192", "weights 50% disk, 4x1", P + " 0 50 0 100 0 100 --gpu-batch-size 4 --num-gpu-batches 1"),
    ("2048x6x32x8192", "weights 100% disk, 4x2", P + " 0 0 0 100 0 100 --gpu-batch-size 4 --num-gpu-batches 2"),
    ("2048x6x32x8192", "cache 100% + act 50% disk, 4x2", P + " 0 100 0 0 0 50 --gpu-batch-size 4 --num-gpu-batches 2"),
    ("2048x6x32x8192", "4-bit weights 100% disk, 4x1",
     P + " 0 0 0 100 0 100 --gpu-batch-size 4 --num-gpu-batches 1 --compress-weight"),
]

# The planner's picks: `opt plan` with this machine's probe, no --eval, limited to the grid's
# largest block so that it competes with the grid's policies (and the run stays short); the
# larger model also under a RAM budget smaller than its weights, so that it must use the disk.
PLANS = [
    ("opt-125m", "planner's pick", ["--max-block", "16"]),
    ("2048x6x32x8192", "planner's pick", ["--max-block", "8"]),
    ("2048x6x32x8192", "planner's pick, --cpu-mem 640M", ["--max-block", "8", "--cpu-mem", "640M"]),
]


def sh(cmd, timeout=900):
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout)


def loadavg():
    try:
        return open("/proc/loadavg").read().split()[:3]
    except OSError:
        return ["?"] * 3


def predict(opt, probe, mdir, m, flags, budget=()):
    r = sh([opt, "plan", "-m", mdir, "--hw", probe, "--prompt-len", str(m["prompt_len"]), "--gen-len", str(m["gen_len"]),
            "--eval", flags, "--json"] + list(budget))
    if r.returncode:
        sys.exit("plan --eval %r failed: %s" % (flags, r.stderr.strip()))
    return json.loads(r.stdout)


def bench(opt, mdir, m, flags, offdir, threads):
    cmd = [opt, "bench", "-m", mdir, "--prompt-len", str(m["prompt_len"]), "--gen-len", str(m["gen_len"]),
           "--offload-dir", offdir, "--json"] + flags.split()
    if threads:
        cmd += ["-t", str(threads)]
    t0 = time.time()
    r = sh(cmd)
    if r.returncode:
        sys.exit("%s failed: %s" % (" ".join(cmd), r.stderr.strip()[-500:]))
    d = json.loads(r.stdout.strip().splitlines()[-1])
    d["wall_s"] = time.time() - t0
    d["load"] = loadavg()
    return d


def probe_now(a, path):
    """A probe at the start of each round of the grid: other jobs on a shared machine change its
    speed from one minute to the next, and a prediction can only be as current as its probe. (A
    quick probe before every run was tried: its 0.15 s measurements were noisier than the drift.)"""
    env = dict(os.environ)
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    r = subprocess.run([a.opt, "probe", "--offload-dir", a.offload_dir, "--disk-bytes", "256M", "-o", path],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    if r.returncode:
        sys.exit("probe failed: %s" % r.stderr.strip())


def cmd_run(a):
    probe = json.load(open(a.probe))
    cases = []
    for model, label, flags in GRID:
        cases.append({"model": model, "label": label, "flags": flags, "kind": "grid"})
    for model, label, extra in PLANS:
        m = MODELS[model]
        mdir = os.path.join(a.models, model)
        r = sh([a.opt, "plan", "-m", mdir, "--hw", a.probe, "--prompt-len", str(m["prompt_len"]), "--gen-len",
                str(m["gen_len"]), "--json"] + extra)
        if r.returncode:
            sys.exit("plan failed: %s" % r.stderr.strip())
        j = json.loads(r.stdout)
        flags = j["flags"]
        budget = extra[extra.index("--cpu-mem"):extra.index("--cpu-mem") + 2] if "--cpu-mem" in extra else []
        cases.append({"model": model, "label": label, "flags": flags, "kind": "plan", "plan_args": extra, "budget": budget,
                      "plan_json": j})
    for c in cases:
        c["runs"] = []
    t0 = time.time()
    for rep in range(a.reps):  # round robin: load drifts spread over every case alike
        pfile = os.path.join(os.path.dirname(a.raw), "probe-round.json")
        probe_now(a, pfile)
        rprobe = json.load(open(pfile))
        for i, c in enumerate(cases):
            m = MODELS[c["model"]]
            d = bench(a.opt, os.path.join(a.models, c["model"]), m, c["flags"], a.offload_dir, a.threads)
            d["probe"] = rprobe
            c["runs"].append(d)
            print("[%3.0fs] rep %d  %-16s %-36s total %7.2f tok/s (prefill %.1f, decode %.2f)  load %s" % (
                time.time() - t0, rep + 1, c["model"], c["label"], d["total_throughput"], d["prefill_throughput"],
                d["decode_throughput"], " ".join(d["load"])), flush=True)
    raw = {"probe_file": os.path.abspath(a.probe), "probe": probe, "models": MODELS, "cases": cases, "reps": a.reps,
           "threads": a.threads, "seconds": time.time() - t0, "machine": machine(), "opt": a.opt, "version": version(a.opt)}
    json.dump(raw, open(a.raw, "w"), indent=1)


def version(opt):
    """The engine measured: git commit (+ uncommitted changes) and the binary's hash."""
    import hashlib
    g = sh(["git", "describe", "--always", "--dirty"])
    return "git %s, binary sha256 %s" % (g.stdout.strip() or "?", hashlib.sha256(open(opt, "rb").read()).hexdigest()[:16])


def machine():
    info = {"kernel": platform.release(), "nproc": os.cpu_count()}
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                info["mem_gib"] = round(int(line.split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    return info


def med(runs, key):
    return statistics.median(r[key] for r in runs)


def err(p, m):
    return (p - m) / m if m else float("nan")


def cmd_report(a):
    raw = json.load(open(a.raw))
    probe = a.probe or raw["probe_file"]
    rows = []
    tmp = os.path.join(os.path.dirname(os.path.abspath(a.raw)), "probe-report.json")
    for c in raw["cases"]:
        m = raw["models"][c["model"]]
        mdir = os.path.join(a.models, c["model"])
        # the prediction from the machine-wide probe, and from the probe taken just before each run
        pj = predict(a.opt, probe, mdir, m, c["flags"], c.get("budget", []))
        per_run = []
        for r in c["runs"]:
            if a.probe or "probe" not in r:
                per_run.append(pj)
                continue
            json.dump(r["probe"], open(tmp, "w"))
            per_run.append(predict(a.opt, tmp, mdir, m, c["flags"], c.get("budget", [])))
        meas = {k: med(c["runs"], k + "_throughput") for k in ("prefill", "decode", "total")}
        pred = {k: statistics.median(q["throughput"][k] for q in per_run) for k in ("prefill", "decode", "total")}
        errs = {k: statistics.median(err(q["throughput"][k], r[k + "_throughput"]) for q, r in zip(per_run, c["runs"]))
                for k in ("prefill", "decode", "total")}
        spread = [min(r["total_throughput"] for r in c["runs"]), max(r["total_throughput"] for r in c["runs"])]
        rows.append({"case": c, "pred": pred, "meas": meas, "errs": errs, "spread": spread, "feasible": pj["feasible"],
                     "bound": pj["bottleneck"], "pred_one": pj["throughput"]})
    out = []
    w = out.append
    pr = raw["probe"]
    mach = raw["machine"]
    w("## Cost model against measurements on this machine (issue 5)")
    w("")
    w("Written by `sh bench/plan_validate.sh` (%.0f s of benchmarks, %d repetitions of every case, round robin; the median "
      "of each throughput). CPU as the compute device, the disk tier real: `--offload-dir` on the local disk; the "
      "disk share of the weights is read from the checkpoint with O_DIRECT, the cache's and activations' from files "
      "the engine writes (buffered I/O). Synthetic f16 checkpoints from `opt synth` (bench/models/)." % (raw["seconds"], raw["reps"]))
    w("")
    w("Engine measured: %s. Predictions: the cost model of the `opt` that wrote this section." % raw.get("version", "?"))
    w("")
    w("Machine: %s, %s vCPUs, %s GiB RAM, kernel %s; %s threads. Probe (`opt probe`): disk read %.2f / write %.2f GB/s "
      "(O_DIRECT), RAM %.1f GB/s, f16 GEMV %.1f GB/s, 4-bit GEMV %.1f GB/s, GEMM %.0f / %.0f GFLOP/s at M = 64 / 512, "
      "a parallel region %.0f us, attention over an f32 / 4-bit cache %.2f / %.2f GB/s. Load average during the runs: %s to %s (other jobs shared the 2 vCPUs)." % (
          mach.get("cpu", "?"), mach.get("nproc"), mach.get("mem_gib"), mach.get("kernel"),
          raw["threads"] or "default (2)", pr["disk_read_bw"] / 1e9, pr["disk_write_bw"] / 1e9, pr["cpu_mem_bw"] / 1e9,
          pr["cpu_gemv_bw"] / 1e9, pr["cpu_gemv_q4_bw"] / 1e9, pr["cpu_gemm_flops_g"] / 1e9, pr["cpu_gemm_flops_p"] / 1e9,
          pr.get("cpu_region_s", 0) * 1e6, pr.get("cpu_attn_bw", 0) / 1e9, pr.get("cpu_attn_q4_bw", 0) / 1e9,
          min(float(r["load"][0]) for c in raw["cases"] for r in c["runs"]),
          max(float(r["load"][0]) for c in raw["cases"] for r in c["runs"])))
    w("")
    w("| model (P + G) | policy | flags | predicted prefill / decode / total tok/s | measured prefill / decode / total (total min–max) | error prefill / decode / total | decode bound |")
    w("|---|---|---|---|---|---|---|")
    n_ok = n_all = 0
    for r in rows:
        c = r["case"]
        m = raw["models"][c["model"]]
        e = [r["errs"][k] for k in ("prefill", "decode", "total")]
        ok = all(abs(x) <= 0.25 for x in e)
        n_all += 1
        n_ok += ok
        w("| %s (%d + %d) | %s | `%s` | %.1f / %.2f / **%.2f** | %.1f / %.2f / **%.2f** (%.2f–%.2f) | %+.0f%% / %+.0f%% / **%+.0f%%**%s | %s |" % (
            c["model"], m["prompt_len"], m["gen_len"], c["label"], c["flags"], r["pred"]["prefill"], r["pred"]["decode"],
            r["pred"]["total"], r["meas"]["prefill"], r["meas"]["decode"], r["meas"]["total"], r["spread"][0], r["spread"][1],
            100 * e[0], 100 * e[1], 100 * e[2], "" if ok else " ✗", r["bound"]["decode"]))
    w("")
    tot = [abs(r["errs"]["total"]) for r in rows]
    one = [abs(err(r["pred_one"]["total"], r["meas"]["total"])) for r in rows]
    w("Within 25%%: %d of %d cases on all three throughputs; %d of %d on total throughput (median |error| of total %.0f%%, "
      "largest %.0f%%). With the one probe taken before the grid instead of each run's: %d of %d within 25%% on total "
      "(median |error| %.0f%%)." % (n_ok, n_all, sum(x <= 0.25 for x in tot), len(tot), 100 * statistics.median(tot),
                                   100 * max(tot), sum(x <= 0.25 for x in one), len(one), 100 * statistics.median(one)))
    w("")
    spreads = [r["spread"][1] / r["spread"][0] for r in rows if r["spread"][0] > 0]
    loads = [float(x["load"][0]) for c in raw["cases"] for x in c["runs"]]
    w("How to read it: each run's prediction comes from the probe taken at the start of its round of the grid "
      "(every case once per round, ~2.5 minutes), because other jobs shared the machine and changed its speed from "
      "minute to minute (load average %.1f to %.1f); "
      "the same policy's total throughput varied by a median factor of %.2f (up to %.2f) between its repetitions, "
      "which bounds how closely any prediction can match one measurement. Errors are the median over the "
      "repetitions of (predicted - measured) / measured; ✗ marks a case outside 25%% on any of the three." % (
          min(loads), max(loads), statistics.median(spreads), max(spreads)))
    w("")
    w("### The planner's pick against the best measured policy")
    w("")
    w("| model | planner (`opt plan` arguments) | its policy | predicted total | measured total | best measured in the grid (same budget, same compression) | planner / best |")
    w("|---|---|---|---|---|---|---|")
    # the same policy measured as a grid case and as a planner's pick: one policy, all its runs
    pooled = {}
    for r in rows:
        pooled.setdefault((r["case"]["model"], r["case"]["flags"]), []).extend(r["case"]["runs"])
    for r in rows:
        r["pooled"] = med(pooled[(r["case"]["model"], r["case"]["flags"])], "total_throughput")
        r["n_pooled"] = len(pooled[(r["case"]["model"], r["case"]["flags"])])
    for r in rows:
        c = r["case"]
        if c["kind"] != "plan":
            continue
        budget = c.get("budget", [])
        cands = []
        for q in rows:
            if q["case"]["model"] != c["model"] or q["case"]["kind"] != "grid":
                continue
            # only the planner's search space: the same compression (the planner was not asked to compress)
            if any((f in q["case"]["flags"]) != (f in " ".join(c["plan_args"])) for f in ("--compress-weight", "--compress-cache")):
                continue
            if budget:  # only the grid's policies that fit the budget
                m = raw["models"][c["model"]]
                pj = predict(a.opt, probe, os.path.join(a.models, c["model"]), m, q["case"]["flags"], budget)
                if not pj["feasible"]:
                    continue
            cands.append(q)
        best = max(cands, key=lambda q: q["pooled"]) if cands else None
        ratio = r["pooled"] / best["pooled"] if best else float("nan")
        w("| %s | `%s` | `%s` | %.2f | %.2f (%d runs) | %s: %.2f (%d runs) | **%.2f**%s |" % (
            c["model"], " ".join(c["plan_args"]), c["flags"], r["pred_one"]["total"], r["pooled"], r["n_pooled"],
            best["case"]["label"] if best else "-", best["pooled"] if best else 0, best["n_pooled"] if best else 0, ratio,
            "" if ratio >= 0.9 else " ✗"))
    w("")
    w("Measured totals here are medians over every run of the policy (a planner's pick that is also a grid policy "
      "pools both cases' runs). The picks' predictions use the one full probe taken before the grid.")
    w("")
    w("Commands:")
    w("")
    w("```")
    w("sh bench/plan_validate.sh            # probe, grid, planner's picks, this section")
    w("opt probe -o probe.json --offload-dir DIR --disk-bytes 512M   # before the grid; --disk-bytes 256M each round")
    w("opt plan --eval \"POLICY\" --hw probe.json -m DIR --prompt-len P --gen-len G --json")
    w("opt bench -m DIR --prompt-len P --gen-len G POLICY --offload-dir DIR --json")
    w("opt plan --hw probe.json -m DIR --prompt-len P --gen-len G --max-block B [--cpu-mem 640M] --json")
    w("```")
    text = "\n".join(out) + "\n"
    if a.md:
        open(a.md, "w").write(text)
    print(text)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["run", "report"])
    ap.add_argument("--opt", required=True)
    ap.add_argument("--probe")
    ap.add_argument("--models", default="bench/models")
    ap.add_argument("--offload-dir")
    ap.add_argument("--raw", required=True)
    ap.add_argument("--md")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.cmd == "run":
        cmd_run(a)
    else:
        cmd_report(a)


if __name__ == "__main__":
    main()
