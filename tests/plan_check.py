"""plan_check.py OPT: the checks of tests/test_plan.sh (see there) for `opt plan` and `opt probe`."""
import concurrent.futures
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile

OPT = sys.argv[1]
GiB = 2.0 ** 30
T4 = ["--hw", "t4", "--gpu-mem", "16G", "--cpu-mem", "208G", "--disk-mem", "1.5T"]
TIERS = ("gpu", "cpu", "disk")
fails = []
n_checks = 0


def check(ok, what):
    global n_checks
    n_checks += 1
    if not ok:
        fails.append(what)
    return ok


def run(args, timeout=120):
    return subprocess.run([OPT] + args, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


def plan(args):
    """(exit status, parsed JSON or None, stderr) of `opt plan --json ARGS`."""
    r = run(["plan", "--json"] + args)
    try:
        j = json.loads(r.stdout) if r.stdout.strip() else None
    except ValueError:
        j = None
    return r.returncode, j, r.stderr.strip()


def pmap(fn, items):
    with concurrent.futures.ThreadPoolExecutor(max(2, os.cpu_count() or 2)) as ex:
        return list(ex.map(fn, items))


def close(a, b, tol):
    return abs(a - b) <= tol * max(abs(a), abs(b), 1e-300)


def flag_percents(flags):
    m = re.search(r"--percent((?: [0-9.]+){6})", flags)
    return [float(v) for v in m.group(1).split()] if m else None


TMP = tempfile.mkdtemp(prefix="opt-plan-test-")

# ---- the probe first: its file serves the CPU-only checks below ----
probe_dir = os.path.join(TMP, "offload")
os.mkdir(probe_dir)
probe_file = os.path.join(TMP, "probe.json")
r = run(["probe", "--offload-dir", probe_dir, "--disk-bytes", "32M", "-o", probe_file], timeout=300)
probe = None
if check(r.returncode == 0, "probe: exit %d: %s" % (r.returncode, r.stderr[-300:])):
    try:
        probe = json.load(open(probe_file))
    except ValueError as e:
        check(False, "probe: %s is not JSON: %s" % (probe_file, e))
if probe:
    check(probe.get("format") == "opt-probe-1", "probe: format %r" % probe.get("format"))
    check(isinstance(probe.get("gpu"), bool), "probe: gpu is not a boolean")
    keys = ["cpu_mem", "disk_mem", "disk_read_bw", "disk_write_bw", "cpu_gemv_bw", "cpu_gemv_q4_bw",
            "cpu_gemm_flops_g", "cpu_gemm_flops_p", "cpu_mem_bw"]
    if probe.get("gpu"):
        keys += ["gpu_mem", "h2d_bw", "d2h_bw", "gpu_mem_bw", "gpu_gemm_flops_g", "gpu_gemm_flops_p",
                 "gpu_bmm_flops_p", "gpu_bmm_flops_g", "gpu_dequant_bw"]
    for k in keys:
        v = probe.get(k)
        check(isinstance(v, (int, float)) and v > 0 and math.isfinite(v), "probe: %s = %r" % (k, v))
    # plausible magnitudes for any machine this runs on
    check(1e8 < probe.get("cpu_mem_bw", 0) < 1e13, "probe: cpu_mem_bw %r" % probe.get("cpu_mem_bw"))
    check(1e6 < probe.get("disk_read_bw", 0) < 1e12, "probe: disk_read_bw %r" % probe.get("disk_read_bw"))
    check(1e8 < probe.get("cpu_gemm_flops_p", 0) < 1e15, "probe: cpu_gemm_flops_p %r" % probe.get("cpu_gemm_flops_p"))
    check(os.listdir(probe_dir) == [], "probe: left files in the offload dir: %s" % os.listdir(probe_dir))
r = run(["probe", "--offload-dir", probe_dir, "--disk-bytes", "8M", "--buffered", "-o", "-"], timeout=300)  # -o -: stdout
if check(r.returncode == 0, "probe --buffered: exit %d: %s" % (r.returncode, r.stderr[-300:])):
    try:
        pb = json.loads(r.stdout)
        check(pb.get("disk_direct_io") is False, "probe --buffered: disk_direct_io %r" % pb.get("disk_direct_io"))
    except ValueError:
        check(False, "probe --buffered: stdout is not JSON")
    check(os.listdir(probe_dir) == [], "probe --buffered: left files behind")
HW_CPU = ["--hw", probe_file]  # this machine (CPU-only unless the build has a GPU)

# ---- 1. plans parse, fit their budgets, and their flags evaluate to the same prediction ----
cases = [
    ("opt-6.7b", T4), ("opt-6.7b", T4 + ["--compress-weight", "--compress-cache"]),
    ("opt-30b", T4), ("opt-30b", T4 + ["--compress-cache"]), ("opt-30b", T4 + ["--compress-weight", "--compress-cache"]),
    ("opt-175b", T4), ("opt-175b", T4 + ["--compress-weight", "--compress-cache"]),
    ("opt-66b", ["--hw", "h100"]), ("opt-175b", ["--hw", "h100", "--prompt-len", "256", "--gen-len", "64"]),
    ("opt-1.3b", HW_CPU + ["--prompt-len", "64", "--gen-len", "16"]),
    ("opt-13b", HW_CPU + ["--cpu-mem", "16G", "--disk-mem", "60G", "--compress-cache"]),
    ("opt-125m", T4 + ["--no-cpu-attention", "--max-block", "64"]),
]


def plan_and_eval(case):
    model, args = case
    name = "%s %s" % (model, " ".join(args))
    rc, j, err = plan(["-m", model] + args)
    out = []
    if not (rc == 0 and j and j.get("feasible")):
        return ["plan %s: exit %d, %s" % (name, rc, err[-300:])], None
    for t in TIERS:
        if not j["peak_bytes"][t] <= j["usable_bytes"][t] * (1 + 1e-9) <= j["budget_bytes"][t] * (1 + 1e-9):
            out.append("plan %s: %s peak %g > usable %g" % (name, t, j["peak_bytes"][t], j["usable_bytes"][t]))
    pct = flag_percents(j["flags"])
    if pct is None or any(not 0 <= v <= 100 for v in pct) or pct[0] + pct[1] > 100 or pct[2] + pct[3] > 100 or pct[4] + pct[5] > 100:
        out.append("plan %s: bad --percent in %r" % (name, j["flags"]))
    if j["gpu"] is False and pct and (pct[0] or pct[2] or pct[4]):
        out.append("plan %s: GPU shares without a GPU: %r" % (name, j["flags"]))
    th = j["throughput"]
    b, s, n = j["policy"]["block"], j["prompt_len"], j["gen_len"]
    if not close(th["total"], b * n / j["time"]["total"], 1e-4):
        out.append("plan %s: total throughput %g != block*gen/time %g" % (name, th["total"], b * n / j["time"]["total"]))
    if not close(th["prefill"], b * s / j["time"]["prefill"], 1e-4):
        out.append("plan %s: prefill throughput is not block*prompt/time" % name)
    # the printed flags, evaluated, must give back the same prediction
    budget_args = [a for a in args if a not in ("--compress-weight", "--compress-cache", "--no-cpu-attention")]
    for flag in ("--max-block",):
        if flag in budget_args:
            i = budget_args.index(flag)
            del budget_args[i:i + 2]
    rc2, e, err2 = plan(["-m", model] + budget_args + ["--eval", j["flags"]])
    if rc2 != 0 or not e:
        out.append("eval of %s's flags: exit %d %s" % (name, rc2, err2[-200:]))
    else:
        if not close(e["throughput"]["total"], th["total"], 1e-9) or not e["feasible"]:
            out.append("eval of %s's flags: %g token/s (feasible %s), plan said %g" % (name, e["throughput"]["total"], e["feasible"], th["total"]))
        for t in TIERS:
            if not close(e["peak_bytes"][t] + 1, j["peak_bytes"][t] + 1, 1e-9):
                out.append("eval of %s's flags: %s peak differs" % (name, t))
    # the text output's first line is the flags
    r = run(["plan", "-m", model] + args)
    if r.returncode != 0 or r.stdout.splitlines()[0] != j["flags"]:
        out.append("plan %s: text output's first line is not the flags" % name)
    return out, j


results = pmap(plan_and_eval, cases)
plans = {}
for (model, args), (errs, j) in zip(cases, results):
    for e in errs:
        check(False, e)
    check(not errs, "")  # count the case
    plans[(model, tuple(args))] = j
fails[:] = [f for f in fails if f]

# ---- 2. budgets too small: refused, naming budgets that work (and 0.2 GiB less does not) ----
small = [
    ("opt-175b", ["--hw", "t4", "--gpu-mem", "16G", "--cpu-mem", "8G", "--disk-mem", "100G"]),
    ("opt-30b", ["--hw", "t4", "--gpu-mem", "1G", "--cpu-mem", "208G", "--disk-mem", "1T"]),
    ("opt-30b", HW_CPU + ["--cpu-mem", "4G", "--disk-mem", "10G"]),
    ("opt-6.7b", ["--hw", "h100", "--gpu-mem", "40G", "--cpu-mem", "1G", "--disk-mem", "0"]),
    ("opt-175b", ["--hw", "t4", "--gpu-mem", "0", "--cpu-mem", "0", "--disk-mem", "0"]),  # all tiers together
    ("opt-30b", HW_CPU + ["--cpu-mem", "0", "--disk-mem", "0"]),
]


def too_small(case):
    model, args = case
    name = "%s %s" % (model, " ".join(args))
    out = []
    rc, j, err = plan(["-m", model] + args)
    if rc == 0 or not j or j.get("feasible") is not False:
        return ["too small %s: exit %d, not refused" % (name, rc)]
    if len(err.splitlines()) != 1 or "no policy fits" not in err:
        out.append("too small %s: stderr %r" % (name, err[:300]))
    need = j["need_bytes"]
    flags = {"gpu": "--gpu-mem", "cpu": "--cpu-mem", "disk": "--disk-mem"}
    finite = [t for t in TIERS if need[t] is not None]
    if not finite:
        out.append("too small %s: no budget named" % name)

    def with_budgets(values):  # args with the given {tier: GiB} budgets
        a = list(args)
        for t, v in values.items():
            if flags[t] in a:
                a[a.index(flags[t]) + 1] = "%.1fG" % v
            else:
                a += [flags[t], "%.1fG" % v]
        return a
    if j.get("need_joint"):
        # one set of budgets to use together: it fits, and 0.2 GiB less of any raised one does not
        budgets = {t: need[t] / GiB for t in finite if need[t] > j["budget_bytes"][t]}
        if not all(re.search(re.escape(flags[t]) + " %.1fG" % v, err) for t, v in budgets.items()):
            out.append("too small %s: message does not name the budgets %s" % (name, budgets))
        rc2, j2, err2 = plan(["-m", model] + with_budgets(budgets))
        if rc2 != 0:
            out.append("too small %s: the named budgets together do not fit: %s" % (name, err2[-200:]))
        for t in budgets:
            rc2, j2, err2 = plan(["-m", model] + with_budgets(dict(budgets, **{t: budgets[t] - 0.2})))
            if rc2 != 1:
                out.append("too small %s: %s 0.2 GiB under the named one still fits" % (name, flags[t]))
        return out
    for t in finite:
        m = re.search(re.escape(flags[t]) + r" ([0-9.]+)G", err)
        if not m or not close(float(m.group(1)) * GiB, need[t], 0.002):
            out.append("too small %s: message does not name %s %.1fG" % (name, flags[t], need[t] / GiB))
        i = args.index(flags[t]) if flags[t] in args else None
        for delta, want in ((0, 0), (-0.2, 1)):
            a = list(args)
            val = "%.1fG" % (need[t] / GiB + delta)
            if i is None:
                a += [flags[t], val]
            else:
                a[i + 1] = val
            rc2, j2, err2 = plan(["-m", model] + a)
            if rc2 != want:
                out.append("too small %s: with %s %s exit %d (want %d): %s" % (name, flags[t], val, rc2, want, err2[-200:]))
    return out


for errs in pmap(too_small, small):
    check(not errs, "; ".join(errs))

# ---- 3. monotone: a larger budget never predicts lower throughput ----
# (the LP breaks ties by moving less data, a term worth < 1e-3 of the time: hence the slack; on
# the CPU-only path the search takes the smallest block within 5% of the best, PLAN_CPU_SLACK)
sweeps = [
    ("opt-30b", ["--hw", "t4", "--cpu-mem", "208G", "--disk-mem", "1.5T"], "--gpu-mem", [2, 4, 8, 12, 16, 24, 40, 80]),
    ("opt-175b", ["--hw", "t4", "--gpu-mem", "16G", "--disk-mem", "1.5T", "--compress-weight"], "--cpu-mem", [48, 96, 160, 208, 320, 512]),
    ("opt-13b", HW_CPU + ["--disk-mem", "100G"], "--cpu-mem", [4, 8, 16, 24, 48]),
    ("opt-66b", ["--hw", "h100", "--gpu-mem", "24G", "--cpu-mem", "64G"], "--disk-mem", [60, 120, 250, 500]),
]
jobs = [(m, a + [flag, "%dG" % v]) for m, a, flag, vals in sweeps for v in vals]
res = dict(zip([(m, tuple(a)) for m, a in jobs], pmap(lambda ma: plan(["-m", ma[0]] + ma[1]), jobs)))
for m, a, flag, vals in sweeps:
    prev = 0
    for v in vals:
        rc, j, err = res[(m, tuple(a + [flag, "%dG" % v]))]
        tp = j["throughput"]["total"] if rc == 0 and j else 0
        slack = 0.05 if j and j.get("gpu") is False else 1e-3
        check(tp >= prev * (1 - slack), "monotone %s %s: %s %dG gives %g token/s < %g" % (m, " ".join(a), flag, v, tp, prev))
        prev = max(prev, tp)
    check(prev > 0, "monotone %s %s: nothing fits at any %s" % (m, " ".join(a), flag))

# ---- 4. compression never increases the bytes moved (nor the disk footprint) ----
flexgen = [  # FlexGen's published T4 policies (flexgen.md section 8; its weights are pinned unless
    # --pin-weight 0) and throughputs (section 9), in opt's spellings
    ("opt-6.7b", "--percent 100 0 100 0 100 0 --gpu-batch-size 2 --num-gpu-batches 1 --pin-weights --no-overlap", "", 25.26),
    ("opt-6.7b", "--percent 100 0 100 0 100 0 --gpu-batch-size 72 --num-gpu-batches 1 --pin-weights", "--compress-weight --compress-cache", 29.12),
    ("opt-30b", "--percent 20 80 0 100 0 100 --gpu-batch-size 48 --num-gpu-batches 3 --cpu-attention --pin-weights", "", 7.32),
    ("opt-30b", "--percent 0 100 0 100 0 100 --gpu-batch-size 64 --num-gpu-batches 8 --cpu-attention --pin-weights", "--compress-cache", 8.38),
    ("opt-175b", "--percent 0 50 0 0 0 100 --gpu-batch-size 32 --num-gpu-batches 8 --cpu-attention", "", 0.69),
    ("opt-175b", "--percent 0 100 0 100 0 100 --gpu-batch-size 48 --num-gpu-batches 3 --cpu-attention",
     "--compress-weight --compress-cache", 1.12),
]
variants = ["", "--compress-weight", "--compress-cache", "--compress-weight --compress-cache"]
jobs = [(m, pol + (" " + v if v else "")) for m, pol, _, _ in flexgen for v in variants]
evals = pmap(lambda mp: plan(["-m", mp[0]] + T4 + ["--eval", mp[1]]), jobs)
ev = dict(zip(jobs, evals))
for m, pol, _, _ in flexgen:
    base = ev[(m, pol)][1]
    for v in variants[1:]:
        j = ev[(m, pol + " " + v)][1]
        if not check(base and j, "compression %s %s: eval failed" % (m, v)):
            continue
        for k in ("h2d", "d2h", "disk_read", "disk_write"):
            check(j["moved_bytes"][k] <= base["moved_bytes"][k] * (1 + 1e-12) + 1,
                  "compression %s %s (%s): %s moves %g > %g bytes" % (m, pol, v, k, j["moved_bytes"][k], base["moved_bytes"][k]))
        check(j["peak_bytes"]["disk"] <= base["peak_bytes"]["disk"] * (1 + 1e-12) + 1, "compression %s %s: disk grows" % (m, v))

# ---- 5. FlexGen's T4 scenarios: plausible policies, and our model of FlexGen's own policies ----
def pl(model, *extra):
    return plans.get((model, tuple(T4 + list(extra))))


def pct(j):
    return flag_percents(j["flags"]) if j else [0] * 6


expect = [  # (plan, description, condition)
    (pl("opt-6.7b"), "6.7B: weights mostly on the GPU", lambda p, j: p[0] >= 75),
    (pl("opt-6.7b"), "6.7B: 15-100 token/s", lambda p, j: 15 <= j["throughput"]["total"] <= 100),
    (pl("opt-6.7b", "--compress-weight", "--compress-cache"), "6.7B 4-bit: nothing on disk", lambda p, j: p[0] + p[1] == 100 and p[2] + p[3] == 100),
    (pl("opt-6.7b", "--compress-weight", "--compress-cache"), "6.7B 4-bit: 15-100 token/s", lambda p, j: 15 <= j["throughput"]["total"] <= 100),
    (pl("opt-30b"), "30B: weights mostly off the GPU, none on disk", lambda p, j: p[0] < 50 and p[0] + p[1] == 100),
    (pl("opt-30b"), "30B: block >= 32", lambda p, j: j["policy"]["block"] >= 32),
    (pl("opt-30b"), "30B: 3-30 token/s", lambda p, j: 3 <= j["throughput"]["total"] <= 30),
    (pl("opt-30b", "--compress-cache"), "30B 4-bit cache: 3-30 token/s", lambda p, j: 3 <= j["throughput"]["total"] <= 30),
    (pl("opt-175b"), "175B: weights partly on disk", lambda p, j: p[0] + p[1] < 100),
    (pl("opt-175b"), "175B: 0.05-3 token/s", lambda p, j: 0.05 <= j["throughput"]["total"] <= 3),
    (pl("opt-175b", "--compress-weight", "--compress-cache"), "175B 4-bit: no weights on disk", lambda p, j: p[0] + p[1] == 100),
    (pl("opt-175b", "--compress-weight", "--compress-cache"), "175B 4-bit: 0.3-5 token/s", lambda p, j: 0.3 <= j["throughput"]["total"] <= 5),
]
for j, what, cond in expect:
    check(j is not None and cond(pct(j), j), "T4 scenario %s: %s" % (what, j and j["flags"]))
for m, pol, comp, published in flexgen:
    j = ev[(m, pol + (" " + comp if comp else ""))][1]
    tp = j["throughput"]["total"] if j else 0
    if m == "opt-175b" and not comp:
        # FlexGen's own disk constant (0.473 GB/s) cannot give its projected 0.69 token/s; the model
        # is disk-bound several times lower (see bench/plan_t4.md)
        check(0.05 < tp < published, "FlexGen's policy %s %s: model %g token/s" % (m, pol, tp))
    else:
        check(abs(tp / published - 1) < 0.35, "FlexGen's policy %s %s %s: model %g token/s, published %g" % (m, pol, comp, tp, published))
    # our plan is at least as good as FlexGen's policy under our own model, where that one fits
    ours = pl(m, *comp.split())
    if j and j["feasible"] and ours:
        check(ours["throughput"]["total"] >= tp * (1 - 1e-3), "plan %s %s: %g token/s < FlexGen's policy's %g in our model" % (m, comp, ours["throughput"]["total"], tp))

# ---- 5b. the CPU-only path (no GPU): terms measured by the probe, on a fixed synthetic machine ----
if probe and not probe["gpu"]:
    for k in ("cpu_gemm_flops_8", "cpu_gemm_q4_flops_8", "cpu_gemm_q4_flops_g", "cpu_gemm_q4_flops_p", "cpu_attn_bw",
              "cpu_attn_q4_bw", "cpu_attn_flops_p", "cpu_attn_q4_flops_p", "cpu_region_s", "io_req_cpu_s"):
        v = probe.get(k)
        check(isinstance(v, (int, float)) and v > 0 and math.isfinite(v), "probe: %s = %r" % (k, v))
    check(probe.get("layer_overhead") == 0, "probe: a CPU-only probe counts regions, layer_overhead %r" % probe.get("layer_overhead"))
OLD = {"format": "opt-probe-1", "gpu": False, "cpu_mem": 16 * GiB, "disk_mem": 100 * GiB, "disk_read_bw": 2e9,
       "disk_write_bw": 2e9, "cpu_gemv_bw": 8e9, "cpu_gemv_q4_bw": 4e9, "cpu_gemm_flops_g": 50e9, "cpu_gemm_flops_p": 80e9,
       "cpu_mem_bw": 8e9, "layer_overhead": 1e-4}  # a probe file of phase 1: the new keys are absent
NEW = dict(OLD, layer_overhead=0, cpu_gemm_flops_8=20e9, cpu_gemm_q4_flops_8=15e9, cpu_gemm_q4_flops_g=30e9,
           cpu_gemm_q4_flops_p=60e9, cpu_attn_bw=4e9, cpu_attn_q4_bw=0.2e9, cpu_attn_flops_p=15e9, cpu_attn_q4_flops_p=1e9,
           cpu_region_s=20e-6, io_req_cpu_s=1e-6)
hwfile = {}
for name, d in (("old", OLD), ("new", NEW), ("fastdisk", dict(NEW, disk_read_bw=1e15, disk_write_bw=1e15))):
    hwfile[name] = os.path.join(TMP, "cpu-%s.json" % name)
    json.dump(d, open(hwfile[name], "w"))


def cpu_eval(hw, pol, model="opt-125m", extra=()):
    rc, j, err = plan(["-m", model, "--hw", hwfile[hw], "--prompt-len", "64", "--gen-len", "16", "--eval", pol] + list(extra))
    check(rc == 0 and j is not None, "cpu eval %s %s: exit %d %s" % (hw, pol, rc, err[-200:]))
    return j["throughput"] if j else {"prefill": 0, "decode": 0, "total": 0}


RAM = "--percent 0 100 0 100 0 100"
old = cpu_eval("old", RAM + " --gpu-batch-size 4 --num-gpu-batches 2")
check(old["total"] > 0, "cpu: a phase-1 probe file (no CPU-path keys) still plans")
rc, j, err = plan(["-m", "opt-1.3b", "--hw", hwfile["old"], "--prompt-len", "64", "--gen-len", "16"])
check(rc == 0 and j and j["feasible"], "cpu: search with a phase-1 probe file: %s" % err[-200:])
# 4-bit cache: the engine's attention over it is slow (the probe's 0.2 GB/s), so decode is slower
f32c = cpu_eval("new", RAM + " --gpu-batch-size 4 --num-gpu-batches 2")
q4c = cpu_eval("new", RAM + " --gpu-batch-size 4 --num-gpu-batches 2 --compress-cache")
check(q4c["decode"] < f32c["decode"], "cpu: 4-bit cache decode %g >= f32 cache %g" % (q4c["decode"], f32c["decode"]))
# the tiled path at its own rate: 8 rows at 20 GFLOP/s take longer per step than 4 rows (both above streaming)
g4 = cpu_eval("new", RAM + " --gpu-batch-size 4 --num-gpu-batches 1")
g8 = cpu_eval("new", RAM + " --gpu-batch-size 8 --num-gpu-batches 1")
check(8 / g8["decode"] > 4 / g4["decode"], "cpu: an 8-row decode step is not slower than a 4-row one (%g, %g token/s)" % (g8["decode"], g4["decode"]))
# the cache's disk share costs CPU (buffered copies, requests) even on an infinitely fast disk
cdisk = cpu_eval("fastdisk", "--percent 0 100 0 0 0 100 --gpu-batch-size 4 --num-gpu-batches 2")
cram = cpu_eval("fastdisk", RAM + " --gpu-batch-size 4 --num-gpu-batches 2")
check(cdisk["decode"] < cram["decode"], "cpu: cache on disk costs no CPU (%g vs %g)" % (cdisk["decode"], cram["decode"]))
# weights on disk: the first layer's read is not hidden, so even an infinitely fast compute pays it
w0 = cpu_eval("new", "--percent 0 0 0 100 0 100 --gpu-batch-size 4 --num-gpu-batches 2")
check(w0["decode"] < cram["decode"], "cpu: weights on disk cost nothing")
# and --no-overlap (every term summed) is never faster than overlapped
for pol in (RAM, "--percent 0 50 0 50 0 50"):
    a = cpu_eval("new", pol + " --gpu-batch-size 4 --num-gpu-batches 2")
    b = cpu_eval("new", pol + " --gpu-batch-size 4 --num-gpu-batches 2 --no-overlap")
    check(b["total"] <= a["total"] * (1 + 1e-9), "cpu: --no-overlap faster than overlapped for %s" % pol)

# ---- 6. bad input: one line on stderr, nothing on stdout, a non-zero exit ----
corrupt = os.path.join(TMP, "corrupt.json")
open(corrupt, "w").write('{"format": "opt-probe-1", "gpu": false, "cpu_mem": 1e10,')
nokey = os.path.join(TMP, "nokey.json")
open(nokey, "w").write('{"format": "opt-probe-1", "gpu": false}')
negative = os.path.join(TMP, "negative.json")
p = dict(probe or {"format": "opt-probe-1", "gpu": False, "cpu_mem": 1e10, "disk_mem": 1e11, "disk_read_bw": 1e9,
                   "disk_write_bw": 1e9, "cpu_gemv_bw": 1e10, "cpu_gemv_q4_bw": 1e10, "cpu_gemm_flops_g": 1e11,
                   "cpu_gemm_flops_p": 1e11, "cpu_mem_bw": 1e10})
p["disk_read_bw"] = -1
json.dump(p, open(negative, "w"))
wrongfmt = os.path.join(TMP, "wrongfmt.json")
open(wrongfmt, "w").write('{"format": "something-else", "gpu": false}')
binary = os.path.join(TMP, "binary.json")
open(binary, "wb").write(bytes((i * 7919 + 13) % 256 for i in range(3000)))
afile = os.path.join(TMP, "afile")
open(afile, "w").write("x")
bad = [  # (argv, text the message must contain)
    (["plan", "-m", "opt-30b", "--gpu-mem", "16X"], "16X"),
    (["plan", "-m", "opt-30b", "--gpu-mem", "-1G"], "negative"),
    (["plan", "-m", "opt-30b", "--cpu-mem", "16"], "unit"),
    (["plan", "-m", "opt-30b", "--disk-mem", "lots"], "lots"),
    (["plan", "-m", "opt-30b", "--disk-mem", "1e999T"], "1e999T"),
    (["plan", "-m", "opt-30b", "--gpu-mem"], "--gpu-mem"),
    (["plan", "-m", "opt-30b", "--hw", "nope"], "nope"),
    (["plan", "-m", "opt-30b", "--hw", os.path.join(TMP, "missing.json")], "missing.json"),
    (["plan", "-m", "opt-30b", "--hw", corrupt], corrupt),
    (["plan", "-m", "opt-30b", "--hw", nokey], nokey),
    (["plan", "-m", "opt-30b", "--hw", negative], "disk_read_bw"),
    (["plan", "-m", "opt-30b", "--hw", wrongfmt], wrongfmt),
    (["plan", "-m", "opt-30b", "--hw", binary], binary),
    (["plan", "-m", "opt-30b", "--hw", TMP], TMP),
    (["plan", "-m", "opt-9b"], "opt-9b"),
    (["plan", "-m", os.path.join(TMP, "no-such-model")], "no-such-model"),
    (["plan"], "-m"),
    (["plan", "-m", "opt-30b", "--prompt-len", "0"], "--prompt-len"),
    (["plan", "-m", "opt-30b", "--prompt-len", "2040", "--gen-len", "32"], "2048"),
    (["plan", "-m", "opt-30b", "--bogus"], "--bogus"),
    (["plan", "-m", "opt-30b", "--hw", "t4", "--eval", "--percent 50 60 0 0 0 0"], "110"),
    (["plan", "-m", "opt-30b", "--eval", "--percent 50 40 0 0 0"], "--percent"),
    (["plan", "-m", "opt-30b", "--eval", "--gpu-batch-size 0"], "--gpu-batch-size"),
    (["plan", "-m", "opt-30b", "--eval", "--frobnicate"], "--frobnicate"),
    (["plan", "-m", "opt-30b", "--hw", probe_file, "--eval", "--percent 10 90 0 100 0 100"] if probe and not probe["gpu"] else
     ["plan", "-m", "opt-30b", "--hw", "t4", "--eval", "--percent 10 90 0 100 0 100 --overlap maybe"], "--"),
    (["probe", "--offload-dir", os.path.join(TMP, "nonexistent")], "nonexistent"),
    (["probe", "--offload-dir", afile], afile),
    (["probe", "--offload-dir", probe_dir, "--disk-bytes", "100P"], probe_dir),
    (["probe", "--disk-bytes", "1X"], "1X"),
    (["probe", "--frob"], "--frob"),
    # FlexGen's spellings, which generate rejects: refused, naming opt's
    (["plan", "-m", "opt-30b", "--hw", "t4", "--eval", "--percent 0 100 0 100 0 100 --pin-weight 0"], "--pin-weights"),
    (["plan", "-m", "opt-30b", "--hw", "t4", "--eval", "--percent 0 100 0 100 0 100 --overlap 0"], "--no-overlap"),
    (["plan", "-m", "opt-30b", "--hw", "t4", "--eval", "--percent 0 100 0 100 0 100 --cpu"], "--cpu-attention"),
    (["plan", "-m", "opt-30b", "--hw", "t4", "--eval", "--percent 0 100 0 100 0 100 --cpu-cache-compute"], "--cpu-attention"),
    (["plan", "-m", "opt-30b", "--hw", "-"], "<stdin>"),  # stdin is empty here
    # pipelines
    (["plan", "-m", "opt-1.3b", "--hw", "t4", "--stages", "0"], "--stages"),
    (["plan", "-m", "opt-1.3b", "--hw", "t4", "--stages", "200"], "24 decoder layers"),
    (["plan", "-m", "opt-1.3b", "--hw", "t4", "--stages", "two"], "--stages"),
    (["plan", "-m", "opt-1.3b", "--hw", "t4", "--stages", "2", "--nodes-bw", "10Gx"], "10Gx"),
    (["plan", "-m", "opt-1.3b", "--hw", "t4", "--stages", "2", "--nodes-bw", "0Gb"], "0Gb"),
    (["plan", "-m", "opt-1.3b", "--hw", "t4", "--stages", "2", "--nodes-bw", "10"], "--nodes-bw"),
    (["plan", "-m", "opt-1.3b", "--hw", "t4", "--stages", "2", "--nodes-bw", "-1Gb"], "-1Gb"),
    (["plan", "-m", "opt-1.3b", "--hw", "t4", "--nodes-bw", "10Gb"], "--stages"),
    (["plan", "-m", "opt-1.3b", "--hw", "t4", "--stages", "2", "--eval", "--percent 0 100 0 100 0 100"], "--stages"),
    (["plan", "-m", "opt-175b", "--hw", "t4", "--stages", "2", "--cpu-mem", "10G", "--disk-mem", "100G"], "stage 0 of 2"),
]


def bad_one(case):
    argv, must = case
    r = run(argv)
    err = r.stderr.strip()
    why = []
    if not 0 < r.returncode < 128:
        why.append("exit %d" % r.returncode)
    if r.stdout:
        why.append("stdout not empty")
    if len(err.splitlines()) != 1:
        why.append("%d lines on stderr" % len(err.splitlines()))
    if must not in err:
        why.append("%r not named" % must)
    return "bad input %s: %s: %s" % (" ".join(shlex.quote(a) for a in argv), ", ".join(why), err[:300]) if why else None


for e in pmap(bad_one, bad):
    check(e is None, e)
for argv in (["plan", "--help"], ["probe", "--help"], ["help", "plan"], ["help", "probe"]):
    r = run(argv)
    check(r.returncode == 0 and "usage: opt " + argv[-1 if argv[0] == "help" else 0] in r.stdout, "%s: exit %d" % (" ".join(argv), r.returncode))

# ---- 7. the flags line runs as printed: generate's spellings, and generate and bench take it ----
GENERATE_FLAGS = {"--percent", "--gpu-batch-size", "--num-gpu-batches", "--cpu-attention", "--compress-weight",
                  "--compress-cache", "--pin-weights", "--no-overlap"}  # opt generate --help's policy flags
for (model, args), j in plans.items():
    if j:
        words = set(w for w in j["flags"].split() if w.startswith("--"))
        check(words <= GENERATE_FLAGS, "plan %s %s: flags %r are not generate's" % (model, " ".join(args), sorted(words - GENERATE_FLAGS)))
        check(("--pin-weights" in words) == j["policy"]["pin_weights"], "plan %s: --pin-weights printed %s, policy says %s"
              % (model, "--pin-weights" in words, j["policy"]["pin_weights"]))
for pol, on in (("--pin-weights --no-overlap", ("--pin-weights", "--no-overlap")), ("", ())):
    rc, j, err = plan(["-m", "opt-30b", "--hw", "t4", "--eval", "--percent 20 80 0 100 0 100 --cpu-attention " + pol])
    if check(rc == 0 and j, "eval %r: exit %d %s" % (pol, rc, err[-200:])):
        check(all(w in j["flags"].split() for w in on) and j["policy"]["overlap"] == ("--no-overlap" not in on) and
              j["policy"]["pin_weights"] == ("--pin-weights" in on) and ("--pin-weights" in on or "pin" not in j["flags"]),
              "eval %r: flags %r, policy %r" % (pol, j["flags"], j["policy"]))
SHAPE = "128x4x4x512"  # 4 MiB of layers, 13 MiB of embeddings: --cpu-mem 16M sends shares to disk
runs = [[], ["--compress-weight", "--compress-cache"], ["--cpu-mem", "16M"], ["--cpu-mem", "16M", "--no-cpu-attention"],
        ["--cpu-mem", "20M", "--compress-cache"], ["--max-block", "6"]]
runs = [(a, None) for a in runs] + [  # and generate's every policy flag, through --eval
    ([], "--percent 0 60 0 50 0 80 --gpu-batch-size 2 --num-gpu-batches 3 --cpu-attention --no-overlap --pin-weights"),
    (["--compress-weight"], "--percent 0 30 0 0 0 100 --gpu-batch-size 3 --cpu-attention")]
disk_seen = False
work = os.path.join(TMP, "run-as-printed")
os.mkdir(work)
for args, pol in runs:
    name = "%s %s" % (" ".join(args), pol or "")
    rc, j, err = plan(["-m", SHAPE, "--hw", hwfile["new"], "--prompt-len", "8", "--gen-len", "2"] + args +
                      (["--eval", pol] if pol else []))
    if not check(rc == 0 and j and j["feasible"], "run as printed %s: plan exit %d %s" % (name, rc, err[-200:])):
        continue
    r = run(["plan", "-m", SHAPE, "--hw", hwfile["new"], "--prompt-len", "8", "--gen-len", "2"] + args + (["--eval", pol] if pol else []))
    flags = r.stdout.splitlines()[0] if r.stdout else ""
    check(flags == j["flags"], "run as printed %s: text and JSON flags differ" % name)
    p = flag_percents(flags) or [0] * 6
    disk_seen |= p[0] + p[1] < 100 or p[2] + p[3] < 100
    check(not pol or all(w in flags.split() for w in pol.split() if w.startswith("--")), "run as printed: %r lost flags of %r" % (flags, pol))
    for cmd in (["bench", "--prompt-len", "8", "--gen-len", "2"], ["generate", "-n", "2", "--ignore-eos"]):
        r2 = subprocess.run([OPT] + cmd + ["-m", "dummy:" + SHAPE, "--offload-dir", work] + shlex.split(flags),
                            input="Hello\nworld\n", capture_output=True, text=True, timeout=300)
        lines = r2.stdout.splitlines()
        check(r2.returncode == 0 and (cmd[0] == "bench" or len(lines) == 2),
              "run as printed: opt %s ... %s: exit %d, %d lines: %s" % (cmd[0], flags, r2.returncode, len(lines), r2.stderr[-300:]))
check(disk_seen, "run as printed: no plan put a share on disk")
# big-memory nodes want blocks of many GPU batches, but generate takes at most 64 (a pipeline's run
# line multiplies a stage's by its groups): these printed 350, 135 and 216 before the search knew.
# The printed command passes generate's option parsing (no prompts: nothing runs, not even the GPU)
MAX_GPU_BATCHES = 64  # opt.h


def big_plan(args):
    return args, run(["plan", "-m"] + args)


for args, r in pmap(big_plan, [["opt-175b", "--hw", "h100"], ["opt-30b", "--hw", "t4", "--stages", "3"],
                               ["opt-66b", "--hw", "t4", "--stages", "8"]]):
    what = "plan -m %s" % " ".join(args)
    lines = r.stdout.splitlines()
    run_line = next((l for l in lines if l.startswith("run ")), None) if "--stages" in args else lines[0] if lines else None
    if not check(r.returncode == 0 and run_line, "%s: exit %d %s" % (what, r.returncode, r.stderr[-200:])):
        continue
    nb = [int(v) for v in re.findall(r"--num-gpu-batches (\d+)", run_line)]
    check(nb and max(nb) <= MAX_GPU_BATCHES, "%s: --num-gpu-batches %r, generate takes at most %d" % (what, nb, MAX_GPU_BATCHES))
    for cmd in run_line.split(" : "):  # each rank's flags, in one process: its model a tiny one, --stages dropped
        words = shlex.split(cmd.split("./opt generate", 1)[-1])
        for flag in ("-m", "--stages"):
            if flag in words:
                del words[words.index(flag):words.index(flag) + 2]
        r2 = subprocess.run([OPT, "generate", "-m", "dummy:64x2x4x256", "-n", "0", "--offload-dir", work] + words,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        check(r2.returncode == 0, "%s: opt generate %s: exit %d %s" % (what, " ".join(words), r2.returncode, r2.stderr[-200:]))

# ---- 8. -m takes dummy:SHAPE and a directory like the other commands; --hw - reads stdin ----
mdir = os.path.join(TMP, "model")
r = run(["synth", "--shape", SHAPE, "-o", mdir])
base = ["--hw", hwfile["new"], "--prompt-len", "8", "--gen-len", "2", "--max-block", "6"]
got = {}
for m in (SHAPE, "dummy:" + SHAPE, mdir):
    rc, j, err = plan(["-m", m] + base)
    check(rc == 0 and j, "plan -m %s: exit %d %s" % (m, rc, err[-200:]))
    got[m] = j and (j["flags"], j["throughput"]["total"])
check(got[SHAPE] and got[SHAPE] == got["dummy:" + SHAPE] == got[mdir], "plan -m SHAPE, dummy:SHAPE, DIR differ: %s" % got)
r = subprocess.run([OPT, "plan", "--json", "-m", SHAPE, "--hw", "-"] + base[2:], stdin=open(hwfile["new"]),
                   capture_output=True, text=True, timeout=120)
check(r.returncode == 0 and json.loads(r.stdout or "{}").get("flags") == (got[SHAPE] or [""])[0],
      "plan --hw - (stdin): exit %d %s" % (r.returncode, r.stderr[-200:]))

# ---- 9. --json is one line: a search, an evaluation, and nothing fits ----
for args in (["-m", "opt-30b", "--hw", "t4"], ["-m", "opt-30b", "--hw", "t4", "--eval", "--percent 20 80 0 100 0 100"],
             ["-m", "opt-175b", "--hw", "t4", "--gpu-mem", "1G", "--cpu-mem", "1G", "--disk-mem", "1G"]):
    r = run(["plan", "--json"] + args)
    ok = r.stdout.count("\n") == 1 and r.stdout.endswith("}\n")
    try:
        json.loads(r.stdout)
    except ValueError:
        ok = False
    check(ok, "plan --json %s: not one line of JSON: %r" % (" ".join(args), r.stdout[:200]))

for args in (["-m", "opt-1.3b", "--hw", "t4", "--stages", "3"], ["-m", "opt-175b", "--hw", "t4", "--stages", "2", "--cpu-mem", "10G"]):
    r = run(["plan", "--json"] + args)
    try:
        ok = r.stdout.count("\n") == 1 and json.loads(r.stdout)["mode"] == "pipeline"
    except ValueError:
        ok = False
    check(ok, "plan --json %s: not one line of JSON: %r" % (" ".join(args), r.stdout[:200]))

# ---- 11. pipelines (--stages): one stage is plain plan; the split; a faster link; the ring ----
def block_of(flags):
    m = re.search(r"--gpu-batch-size (\d+) --num-gpu-batches (\d+)", flags)
    return int(m.group(1)) * int(m.group(2))


ONE = [("opt-30b", "--hw", "t4"), ("opt-175b", "--hw", "t4"), ("opt-1.3b", "--hw", "h100", "--compress-weight", "--compress-cache"),
       ("opt-125m", "--hw", hwfile["new"], "--prompt-len", "64", "--gen-len", "16")]


def one_stage(case):
    a = ["-m"] + list(case)
    return plan(a + ["--stages", "1"]), plan(a)


for case, ((rc, j, err), (rc0, j0, err0)) in zip(ONE, pmap(one_stage, ONE)):
    what = "plan --stages 1 %s" % " ".join(case)
    if not check(rc == 0 and rc0 == 0 and j and j0, "%s: exit %d/%d %s %s" % (what, rc, rc0, err[-200:], err0[-200:])):
        continue
    for k in ("prefill", "decode", "total"):
        check(close(j["throughput"][k], j0["throughput"][k], 1e-9), "%s: %s throughput %g, plain plan %g" % (what, k, j["throughput"][k], j0["throughput"][k]))
        check(close(j["single"]["throughput"][k], j0["throughput"][k], 1e-12), "%s: one node's %s throughput %g, plain plan %g" % (what, k, j["single"]["throughput"][k], j0["throughput"][k]))
        check(close(j["time"][k], j0["time"][k], 1e-9), "%s: %s time %g, plain plan %g" % (what, k, j["time"][k], j0["time"][k]))
    check(j["stage"][0]["flags"] == j0["flags"] and j["groups"] == 1 and j["block"] == j0["policy"]["block"] and abs(j["bubble"]) < 1e-9,
          "%s: policy %r x %d groups (bubble %g), plain plan %r" % (what, j["stage"][0]["flags"], j["groups"], j["bubble"], j0["flags"]))


def ring(j, n):
    """The block's prefill and total time by the rules of DESIGN.md (first come, first served)."""
    N, G = j["stages"], j["groups"]
    P = [s["time"]["prefill"] for s in j["stage"]]
    D = [s["time"]["decode"] / (n - 1) for s in j["stage"]]
    lt = j["link_time"]
    stage, link, back, tp = [0.0] * N, [0.0] * N, [0.0] * G, 0
    for t in range(n):
        for g in range(G):
            at = back[g] if t else 0.0
            for i in range(N):
                stage[i] = max(at, stage[i]) + (D[i] if t else P[i])
                c = (lt["decode"] if t else lt["prefill"]) if i < N - 1 else lt["tokens"]
                at = link[i] = max(stage[i], link[i]) + c
            back[g] = at
        if t == 0:
            tp = stage[N - 1]
    return tp, stage[N - 1]


J6 = 2e-5  # --json's numbers have 6 significant digits
def pipe_numbers(j, s, n):
    """Prefill, decode and total throughput and the bubble, from the ring (FlexGen's definitions)."""
    tp, T = ring(j, n)
    busy = max(j["groups"] * (st["time"]["prefill"] + st["time"]["decode"]) for st in j["stage"])
    return j["block"] * s / tp, j["block"] * (n - 1) / (T - tp), j["block"] * n / T, 1 - busy / T


SPLITS = [("opt-175b", "t4", 4, []), ("opt-175b", "h100", 7, []), ("opt-1.3b", "t4", 24, []), ("opt-125m", "h100", 5, ["--prompt-len", "32"]),
          ("opt-350m", "t4", 3, ["--compress-weight"])]


def split_case(case):
    model, hw, N, extra = case
    return plan(["-m", model, "--hw", hw, "--stages", str(N)] + extra)


LAYERS = {"opt-175b": 96, "opt-1.3b": 24, "opt-125m": 12, "opt-350m": 24}
for (model, hw, N, extra), (rc, j, err) in zip(SPLITS, pmap(split_case, SPLITS)):
    what = "plan -m %s --hw %s --stages %d %s" % (model, hw, N, " ".join(extra))
    if not check(rc == 0 and j, "%s: exit %d %s" % (what, rc, err[-200:])):
        continue
    st = j["stage"]
    check(len(st) == N and j["split"] == [s["layers"] for s in st] and sum(j["split"]) == LAYERS[model] and min(j["split"]) >= 1,
          "%s: split %r" % (what, j["split"]))
    check(all(st[i]["first_layer"] == sum(j["split"][:i]) for i in range(N)), "%s: stages not contiguous" % what)
    check([s["embed"] for s in st] == [True] + [False] * (N - 1) and [s["output"] for s in st] == [False] * (N - 1) + [True],
          "%s: the embedding not on stage 0 or the output not on the last" % what)
    check(j["groups"] >= N and j["block"] == j["groups"] * j["group"] and all(block_of(s["flags"]) == j["group"] for s in st),
          "%s: %d groups of %d, block %d, stage blocks %r" % (what, j["groups"], j["group"], j["block"], [block_of(s["flags"]) for s in st]))
    # the ring, recomputed here from the times the plan reports
    tp, T = ring(j, 32)
    pre, dec, tot, bub = pipe_numbers(j, 32 if "--prompt-len" in extra else 512, 32)
    check(close(j["time"]["prefill"], tp, J6) and close(j["time"]["total"], T, J6),
          "%s: block time %g (prefill %g), the ring gives %g (%g)" % (what, j["time"]["total"], j["time"]["prefill"], T, tp))
    t = j["throughput"]
    check(close(t["total"], tot, J6) and close(t["prefill"], pre, J6) and close(t["decode"], dec, J6), "%s: throughput %r" % (what, t))
    busy = [j["groups"] * (s["time"]["prefill"] + s["time"]["decode"]) for s in st]
    check(busy[j["bottleneck_stage"]] >= max(busy) * (1 - J6) and abs(j["bubble"] - bub) < 1e-4,
          "%s: bubble %g of stage %d, busy %r of %g" % (what, j["bubble"], j["bottleneck_stage"], busy, T))
    check(j["single"] is None or j["single"]["throughput"]["total"] > 0, "%s: one node's prediction" % what)

# the ring's rules by hand, on a tiny pipeline: two stages of 4 and 3 s in prefill, 1 and 2 s per decode
# step; links 1 s (prefill), 0.5 s (decode), 0.25 s (tokens back); two groups, two tokens
hand = {"stages": 2, "groups": 2, "stage": [{"time": {"prefill": 4.0, "decode": 1.0}}, {"time": {"prefill": 3.0, "decode": 2.0}}],
        "link_time": {"prefill": 1.0, "decode": 0.5, "tokens": 0.25}}
# prefill: stage 0 ends groups at 4, 8; link to 5, 9; stage 1 at 8, 12 (prefill time 12); tokens back at 8.25, 12.25
# decode: stage 0 at max(8.25, 8) + 1 = 9.25, 13.25; links 9.75, 13.75; stage 1 at max(9.75, 12) + 2 = 14, 16
check(ring(hand, 2) == (12.0, 16.0), "the ring by hand: %r, not (12, 16)" % (ring(hand, 2),))
# busy 2 x (4 + 1) = 10 s and 2 x (3 + 2) = 10 s of 16: a bubble of 3/8; with 1 sequence per group
# and prompt 8, prefill 2 x 8 / 12, decode 2 x 1 / (16 - 12), total 2 x 2 / 16 token/s
hand.update(group=1, block=2)
check(pipe_numbers(hand, 8, 2) == (2 * 8 / 12, 2 / 4, 4 / 16, 3 / 8), "the ring's throughput and bubble by hand: %r" % (pipe_numbers(hand, 8, 2),))

# a faster link never predicts less, and more when the links matter (OPT-125m: a small step per stage)
BWS = ["1Gb", "10Gb", "100Gb", "1000Gb"]
for model, hw, extra in (("opt-125m", "h100", []), ("opt-175b", "t4", [])):
    tot = [j["throughput"]["total"] if j else 0 for rc, j, err in
           pmap(lambda bw: plan(["-m", model, "--hw", hw, "--stages", "4", "--nodes-bw", bw] + extra), BWS)]
    strict = model == "opt-125m"
    check(all(b > a if strict else b >= a * (1 - 1e-9) for a, b in zip(tot, tot[1:])), "%s on 4 x %s: throughput %r over links %r" % (model, hw, tot, BWS))
rc, j, err = plan(["-m", "opt-30b", "--hw", "t4", "--stages", "2", "--nodes-bw", "1.25G"])
rc2, j2, err2 = plan(["-m", "opt-30b", "--hw", "t4", "--stages", "2", "--nodes-bw", "10737418240bit/s"])
check(rc == 0 and rc2 == 0 and close(j["link_bw"], 1.25 * GiB, J6) and close(j2["link_bw"], 1.25 * GiB, J6),
      "--nodes-bw 1.25G (bytes/s, binary) and 10737418240bit/s: %r, %r" % (j and j["link_bw"], j2 and j2["link_bw"]))

# ---- 10. without --hw: this machine, measured, named in one line on stderr; its flags run ----
r = run(["plan", "--json", "-m", "64x2x4x256", "--prompt-len", "8", "--gen-len", "2", "--max-block", "4"], timeout=300)
err = r.stderr.strip().splitlines()
try:
    j = json.loads(r.stdout)
except ValueError:
    j = None
if check(r.returncode == 0 and j, "plan without --hw: exit %d %s" % (r.returncode, r.stderr[-300:])):
    check(len(err) == 1 and "this machine" in err[0] and "--hw t4|h100|FILE" in err[0], "plan without --hw: stderr %r" % err)
    check(j["hardware"].startswith("this machine") and (probe is None or j["gpu"] == probe["gpu"]),
          "plan without --hw: planned for %r (gpu %s)" % (j["hardware"], j["gpu"]))
    if not j["gpu"]:  # a CPU-only machine: the plan must run here
        r2 = run(["bench", "-m", "dummy:64x2x4x256", "--prompt-len", "8", "--gen-len", "2", "--offload-dir", work] + j["flags"].split(), timeout=300)
        check(r2.returncode == 0, "plan without --hw: its flags do not run here: %s" % r2.stderr[-300:])

for f in fails[:40]:
    print("FAIL " + f)
print("plan and probe: %d passed / %d total" % (n_checks - len(fails), n_checks))
subprocess.run(["rm", "-rf", TMP])
sys.exit(1 if fails else 0)
