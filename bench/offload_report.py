#!/usr/bin/python3
"""bench/offload_report.py OUT RESULTS.md: turns bench/offload.sh's raw output (OUT/manifest.tsv,
the JSON and stderr files it names, OUT/disk.tsv, OUT/machine.txt) into the "Offloading on the
CPU machine (issue 4)" section of RESULTS.md, replacing only that section (between its marker
comments, appended when absent) and keeping everything else. Never fails on a missing row."""
import json
import os
import re
import statistics
import sys

BEGIN = "<!-- BEGIN offload-cpu (issue 4): written by bench/offload.sh, edits here are overwritten -->"
END = "<!-- END offload-cpu (issue 4) -->"
GB = 1e9
GiB = float(1 << 30)


def load_json(path):
    try:
        with open(path) as f:
            lines = [l for l in f.read().splitlines() if l.startswith("{")]
        return json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None


def plan_rows(path):
    """{row: (gpu, cpu, disk)} bytes from the memory plan on stderr."""
    try:
        text = open(path, errors="replace").read()
    except OSError:
        return {}
    lines = text.splitlines()
    for i, l in enumerate(lines):
        m = re.match(r"\s+gpu (MiB|GiB)\s+cpu (MiB|GiB)\s+disk (MiB|GiB)\s*$", l)
        if not m:
            continue
        unit = 1 << (30 if m.group(1) == "GiB" else 20)
        rows = {}
        for l2 in lines[i + 1:]:
            m2 = re.match(r"\s+(\S.*?)\s+(-?[0-9.]+)\s+(-?[0-9.]+)\s+(-?[0-9.]+)(\s.*)?$", l2)
            if not m2:
                break
            rows[m2.group(1)] = tuple(float(m2.group(k)) * unit for k in (2, 3, 4))
        return rows
    return {}


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, nd=2):
    return "–" if x is None else f"{x:.{nd}f}"


def spread(xs, nd=2):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    if len(xs) == 1:
        return f"{xs[0]:.{nd}f}"
    return f"{statistics.median(xs):.{nd}f} ({min(xs):.{nd}f}–{max(xs):.{nd}f})"


def main():
    out, results = sys.argv[1], sys.argv[2]
    mach = {}
    try:
        for l in open(os.path.join(out, "machine.txt")).read().splitlines():
            if ": " in l:
                k, v = l.split(": ", 1)
                mach[k] = v
    except OSError:
        pass
    disk = {}
    try:
        for l in open(os.path.join(out, "disk.tsv")):
            kind, tag, bw = l.rstrip("\n").split("\t")
            disk.setdefault(kind, {})[tag] = float(bw)
    except (OSError, ValueError):
        pass
    runs = []
    try:
        for l in open(os.path.join(out, "manifest.tsv")):
            name, b, pol, load0, load1, jf, ef = l.rstrip("\n").split("\t")
            runs.append(dict(name=name, b=int(b), pol=pol, load=(float(load0), float(load1)), j=load_json(jf), plan=plan_rows(ef)))
    except (OSError, ValueError):
        pass
    G = None
    m = re.search(r"generate (\d+)", mach.get("threads", ""))
    if m:
        G = int(m.group(1))
    # the bound's bandwidth: the best O_DIRECT read measured by any of the probes (the virtual
    # disk's throughput varies with other tenants, so the best figure is what it can at least do)
    bw_all = [v for kind in ("dd4", "dd1", "probe") for v in disk.get(kind, {}).values()]
    bw = max(bw_all) if bw_all else None

    L = ["## Offloading on the CPU machine (issue 4)", ""]
    L.append(f"Run {mach.get('date', '?')} by `sh bench/offload.sh` ({mach.get('runtime_s', '?')} s). "
             f"Synthetic OPT-1.3b (`opt synth --shape opt-1.3b`, f16, 2.63 GB, tied lm_head), `opt bench --prompt-len P "
             f"--gen-len G --percent WG WC 0 100 0 100 --gpu-batch-size B --num-gpu-batches 1` with the CPU as the compute "
             f"device: the weights' disk share is read from the checkpoint file itself (O_DIRECT, 4 I/O threads, 8 MiB "
             f"requests) every step, double-buffered a layer ahead; KV cache and activations in RAM. "
             f"Decode throughput = B·(G−1) / decode time (FlexGen's definition). Each row: median (min–max) over the "
             f"repetitions; separate processes.")
    L.append("")
    L.append("Machine:")
    L.append("")
    for k in ("cpu", "memory", "disk", "opt", "threads", "load_start", "load_end"):
        if k in mach:
            L.append(f"- {k}: {mach[k]}")
    loads = [x for r in runs for x in r["load"]]
    if loads:
        L.append(f"- 1-minute load average at the start / end of each run: {min(loads):.1f} – {max(loads):.1f} "
                 f"(median {statistics.median(loads):.1f}) on {os.cpu_count()} CPUs")
    L.append("")
    if loads and max(loads) > 0.5 * (os.cpu_count() or 1):
        L.append(f"**The machine was busy** (other jobs on the same 2 vCPUs, load up to {max(loads):.1f}): compute-bound "
                 f"figures (prefill, all-in-RAM decode) are depressed and noisy; disk-bound figures less so. Rerun on an "
                 f"idle machine for figures to quote.")
        L.append("")
    L.append("Disk read bandwidth, O_DIRECT, before / after the runs:")
    L.append("")
    names = {"dd4": "4 × dd bs=8M iflag=direct over the checkpoint (opt's pattern)", "dd1": "1 × dd bs=8M iflag=direct",
             "probe": "`opt probe` (1 GiB file written then read)"}
    for kind in ("dd4", "dd1", "probe"):
        if kind in disk:
            L.append(f"- {names[kind]}: " + " / ".join(f"{disk[kind][t] / GB:.2f} GB/s" for t in ("before", "after") if t in disk[kind]))
    if bw:
        L.append(f"- the bound below uses {bw / GB:.2f} GB/s, the best of these (the virtual disk's throughput varies "
                 f"with other tenants; the best figure is what it can at least deliver)")
    L.append("")

    cases = [r for r in runs if r["name"] != "dummy:opt-13b"]
    ram = {}
    for r in cases:
        if r["name"] == "all in RAM (policy)" and r["j"]:
            ram.setdefault(r["b"], []).append(r["j"]["decode_throughput"])
    L.append("| policy (weights cpu %) | B | decode tok/s | weights read from disk per step (plan / measured) | per token | "
             "disk-read bound tok/s (best probe) | fraction | bound at the bandwidth achieved in the run | fraction | "
             "I/O busy, % of wall | compute hidden under I/O | I/O wait s / wall s | prefill tok/s | peak RSS GiB |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    order = []
    for r in cases:
        key = (r["name"], r["b"], r["pol"])
        if key not in order:
            order.append(key)
    for key in order:
        rs = [r for r in cases if (r["name"], r["b"], r["pol"]) == key and r["j"]]
        if not rs:
            L.append(f"| {key[0]} | {key[1]} | failed |" + " |" * 11)
            continue
        b = key[1]
        dec = [r["j"]["decode_throughput"] for r in rs]
        pre = [r["j"]["prefill_throughput"] for r in rs]
        rss = [r["j"]["peak_rss_gib"] for r in rs]
        pol = key[2]
        if pol == "-":
            L.append(f"| plain engine (no policy) | {b} | {spread(dec)} |" + " – |" * 9 + f" {spread(pre, 1)} | {spread(rss)} |")
            continue
        wpct = pol.split()[1] + "% in RAM"
        wd_plan = med([r["plan"].get("weights", (0, 0, None))[2] for r in rs])
        gsteps = G or rs[0]["j"].get("gen_len")
        wd_meas = med([r["j"]["disk_read_gib"] * GiB / gsteps for r in rs]) if gsteps else None
        per_step = wd_plan if wd_plan is not None else wd_meas
        if not per_step:
            L.append(f"| {key[0]} ({wpct}) | {b} | {spread(dec)} | 0 |" + " – |" * 6 + f" 0% | – | – | {spread(pre, 1)} | {spread(rss)} |")
            continue
        bound = b * bw / per_step if bw else None
        frac = [100 * d / bound for d in dec] if bound else []
        # the bandwidth the disk delivered in each run: bytes over the time some read was in flight
        ach = [r["j"]["disk_read_gib"] * GiB / r["j"]["io_busy_s"] for r in rs if r["j"].get("io_busy_s")]
        b_ach = [b * a / per_step for a in ach]
        frac_ach = [100 * d / x for d, x in zip(dec, b_ach)]
        walls = [r["j"]["prefill_latency_s"] + r["j"]["decode_latency_s"] for r in rs]
        busy = [100 * r["j"]["io_busy_s"] / w for r, w in zip(rs, walls)]
        hidden = [100 * max(0.0, r["j"]["compute_s"] + r["j"]["io_busy_s"] - w) / r["j"]["compute_s"] for r, w in zip(rs, walls) if r["j"]["compute_s"]]
        wait = med([r["j"].get("io_wait_s") for r in rs])
        L.append(f"| {key[0]} ({wpct}) | {b} | {spread(dec)} | {(wd_plan or 0) / GB:.3f} / {(wd_meas or 0) / GB:.3f} GB | "
                 f"{per_step / b / 1e6:.0f} MB | {fmt(bound)} | {spread(frac, 0)}% | {spread(b_ach)} (at {spread([a / GB for a in ach])} GB/s) | "
                 f"{spread(frac_ach, 0)}% | {spread(busy, 0)}% | {spread(hidden, 0)}% | {fmt(wait, 1)} / {fmt(med(walls), 1)} | "
                 f"{spread(pre, 1)} | {spread(rss)} |")
    L.append("")
    L.append("Columns: *weights read from disk per step*: the plan's disk share of the weights (what every step, prefill "
             "or decode, reads: the layers' disk rows plus the tied lm_head's, i.e. the embedding's) / the bytes the I/O "
             "threads actually read divided by the G steps. *Disk-read bound*: B × bandwidth / those bytes, the "
             "throughput if a step did nothing but read them, at the best bandwidth any probe measured, and at the "
             "bandwidth the disk delivered during that run (bytes read / seconds with a read in flight): the second "
             "fraction is the schedule's own efficiency, the first also carries the shared disk's variation. "
             "*I/O busy*: share of the run (prefill + decode) with a read in flight. *Compute hidden under I/O*: "
             "(compute + I/O busy − wall) / compute, i.e. `opt bench`'s overlap seconds over the compute seconds "
             "(its `overlap_fraction` divides the same seconds by the wall time). *I/O wait*: seconds the compute "
             "thread waited for reads. The prefill step (128·B prompt tokens, compute-heavy) is inside the run-wide "
             "figures, so I/O busy is lower and I/O wait higher than in decode alone.")
    L.append("")

    big = [r for r in runs if r["name"] == "dummy:opt-13b"]
    L.append("### Larger than RAM: `-m dummy:opt-13b`")
    L.append("")
    if "big_skipped" in mach:
        L.append(f"Skipped: {mach['big_skipped']}.")
    elif not big or not big[0]["j"]:
        L.append("Failed or not run (see the script's log).")
    else:
        r = big[0]
        j = r["j"]
        wd = r["plan"].get("weights", (0, 0, 0))
        L.append(f"`opt bench -m dummy:opt-13b --prompt-len {j['prompt_len']} --gen-len {j['gen_len']} --percent {r['pol']} "
                 f"--gpu-batch-size 1`: 12.85 B parameters, 25.7 GB (23.9 GiB) of f16 weights against "
                 f"{mach.get('memory', '?')}. The dummy's disk share ({wd[2] / GB:.1f} GB per the plan) is generated and written "
                 f"into the offload dir first, then read back every step (through the page cache: it is our own file, not "
                 f"opened O_DIRECT, so a part of it may be served from RAM).")
        L.append("")
        L.append("| decode tok/s | decode s/token | prefill s | weights in RAM / on disk (plan) | disk read per step (measured) | "
                 "achieved read GB/s | overlap | I/O wait s | peak RSS GiB | accounted peak cpu / disk GiB | whole run incl. writing s |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|")
        steps = j["gen_len"]
        L.append(f"| {j['decode_throughput']:.3f} | {1 / j['decode_throughput'] if j['decode_throughput'] else 0:.1f} | "
                 f"{j['prefill_latency_s']:.1f} | {wd[1] / GB:.2f} / {wd[2] / GB:.2f} GB | {j['disk_read_gib'] * GiB / steps / GB:.2f} GB | "
                 f"{j.get('disk_read_gibps', 0) * GiB / GB:.2f} | {100 * j.get('overlap_fraction', 0):.0f}% | {j.get('io_wait_s', 0):.1f} | "
                 f"{j['peak_rss_gib']:.2f} | {j.get('peak_cpu_gib', 0):.2f} / {j.get('peak_disk_gib', 0):.2f} | {mach.get('big_wall_s', '?')} |")
    L.append("")
    section = "\n".join([BEGIN] + L + [END]) + "\n"

    try:
        text = open(results).read()
    except OSError:
        text = "# Benchmark results\n\n"
    if BEGIN in text and END in text:
        a = text.index(BEGIN)
        z = text.index(END) + len(END)
        if z < len(text) and text[z] == "\n":
            z += 1
        text = text[:a] + section + text[z:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(results + ".tmp", "w") as f:
        f.write(text)
    os.replace(results + ".tmp", results)
    print(f"offload_report: wrote the issue-4 section of {results}")


if __name__ == "__main__":
    main()
