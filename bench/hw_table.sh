#!/bin/sh
# bench/hw_table.sh: what each OPT size needs and how fast it runs, as the cost model predicts
# (`opt plan`), on three machines: this one (measured by `opt probe`, or PROBE=FILE), FlexGen's
# T4 node (--hw t4) and an H100 node (--hw h100); f16 weights, and 4-bit weights and cache.
# Writes the table into README.md and bench/RESULTS.md (between their hw-table markers) and
# prints it. Predictions, not measurements: bench/plan_validate.sh checks the model on this
# machine.
#
#   PROBE   a probe file for this machine [measured now: opt probe]
#   OPT     the binary [./opt]     PYTHON  [/usr/bin/python3]
set -eu
cd "$(dirname "$0")/.."
OPT=${OPT:-./opt}
PYTHON=${PYTHON:-/usr/bin/python3}
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
if [ -z "${PROBE:-}" ]; then
    echo "hw_table: measuring this machine (opt probe, ~15 s)" >&2
    "$OPT" probe -o "$W/probe.json" --offload-dir "${TMPDIR:-/tmp}" >&2
    PROBE=$W/probe.json
fi
for m in opt-1.3b opt-6.7b opt-13b opt-30b opt-66b opt-175b; do
    for hw in cpu t4 h100; do
        spec=$hw; [ "$hw" = cpu ] && spec=$PROBE
        for c in f16 q4; do
            flags=""; [ "$c" = q4 ] && flags="--compress-weight --compress-cache"
            # a plan that fits nothing exits 1 and says what it would need: that is a result too
            # shellcheck disable=SC2086
            "$OPT" plan -m "$m" --hw "$spec" --json $flags >"$W/$m.$hw.$c.json" 2>/dev/null || true
        done
    done
done
"$PYTHON" - "$W" "$PROBE" "$OPT" >"$W/table.md" <<'EOF'
import json, os, subprocess, sys
W, probe, opt = sys.argv[1], sys.argv[2], sys.argv[3]
G = 2.0 ** 30
p = json.load(open(probe))
models = ['opt-1.3b', 'opt-6.7b', 'opt-13b', 'opt-30b', 'opt-66b', 'opt-175b']
params = {'opt-1.3b': 1.32, 'opt-6.7b': 6.66, 'opt-13b': 12.85, 'opt-30b': 29.97, 'opt-66b': 65.7, 'opt-175b': 174.6}


def gib(b):
    return '%.0f' % (b / G) if b >= 10 * G else '%.1f' % (b / G)


def cell(m, hw, c):
    try:
        with open(os.path.join(W, '%s.%s.%s.json' % (m, hw, c))) as f:
            r = json.loads(f.read())
    except (OSError, ValueError):
        return 'n/a'
    if not r.get('feasible'):
        need = r.get('need_bytes', {})
        alt = [('%s GiB %s' % (gib(need[t]), 'RAM' if t == 'cpu' else t)) for t in ('cpu', 'disk') if need.get(t)]
        return 'does not fit: needs %s' % ' or '.join(alt) if alt else 'does not fit'
    pol, pk = r['policy'], r['peak_bytes']
    w = pol['percent'][:2]
    where = 'weights %g/%g/%g%% gpu/cpu/disk' % (w[0], w[1], round(100 - w[0] - w[1], 2))
    t = r['throughput']['total']
    tput = '%.0f' % t if t >= 100 else '%.1f' % t if t >= 10 else '%.2g' % t
    return '**%s** tok/s; %s; RAM %s GiB%s' % (tput, where, gib(pk['cpu']),
                                              ', disk %s GiB' % gib(pk['disk']) if pk['disk'] >= 0.05 * G else '')


hwname = {'cpu': 'this machine: %d threads, %s GiB RAM, %s GiB disk at %.1f GB/s, no GPU' % (
    p['threads'], gib(p['cpu_mem']), gib(p['disk_mem']), p['disk_read_bw'] / 1e9),
    't4': 'T4 node: 16 GB GPU, 208 GB RAM, 1.5 TB NVMe (FlexGen\'s)',
    'h100': 'H100 node: 80 GB GPU, 256 GiB RAM, 3.5 TiB NVMe'}
print('| model | weights f16 / 4-bit | compression | %s |' % ' | '.join(hwname[h] for h in ('cpu', 't4', 'h100')))
print('|---|---|---|---|---|---|')
for m in models:
    n = params[m] * 1e9
    for c in ('f16', 'q4'):
        size = '%s / %s GiB' % (gib(2 * n), gib(n * (4 + 32 / 64) / 8)) if c == 'f16' else ''
        print('| %s | %s | %s | %s |' % (m if c == 'f16' else '', size, 'f16' if c == 'f16' else '4-bit w + cache',
                                         ' | '.join(cell(m, h, c) for h in ('cpu', 't4', 'h100'))))
ver = subprocess.run([opt, '--version'], capture_output=True, text=True).stdout.strip() or 'opt'
print('\nPrompt 512, 32 generated, total throughput (FlexGen\'s definition), the best policy `opt plan` '
      'finds within each machine\'s budgets; RAM and disk are the plan\'s peaks. This machine was measured by '
      '`opt probe` on %s (%s); T4 and H100 are the built-in profiles (`--hw t4|h100`). Made by `sh bench/hw_table.sh`.'
      % (p.get('date', '?'), ver))
EOF
for f in README.md bench/RESULTS.md; do "$PYTHON" bench/section.py hw-table "$f" <"$W/table.md"; done
cat "$W/table.md"
