#!/bin/sh
# bench/pipeline_plan.sh: what a pipeline over several identical nodes would give, as the cost
# model predicts it (`opt plan --stages N --nodes-bw BW`): OPT-175B (and 30B, 66B) over 4 of
# FlexGen's T4 nodes and over 8 H100 nodes, at 10 and 100 Gb/s links, f16 and 4-bit weights and
# cache, against one node of the same kind. Writes the table into bench/RESULTS.md and a summary
# into README.md (between their pipeline-plan markers) and prints the table. Predictions, not
# measurements; the assumptions are stated under the table.
#
#   OPT     the binary [./opt]     PYTHON  [/usr/bin/python3]
set -eu
cd "$(dirname "$0")/.."
OPT=${OPT:-./opt}
PYTHON=${PYTHON:-/usr/bin/python3}
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
for m in opt-30b opt-66b opt-175b; do
    for nodes in t4:4 h100:8; do
        hw=${nodes%:*} n=${nodes#*:}
        for bw in 10Gb 100Gb; do
            for c in f16 q4; do
                flags=""; [ "$c" = q4 ] && flags="--compress-weight --compress-cache"
                # a pipeline that fits nothing exits 1 with its reason in the JSON: a result too
                # shellcheck disable=SC2086
                "$OPT" plan -m "$m" --hw "$hw" --stages "$n" --nodes-bw "$bw" --json $flags \
                    >"$W/$m.$hw.$bw.$c.json" 2>/dev/null || true
            done
        done
    done
done
"$PYTHON" - "$W" "$OPT" <<'EOF'
import json, os, subprocess, sys
W, opt = sys.argv[1], sys.argv[2]
here = os.getcwd()
sys.path.insert(0, os.path.join(here, 'bench'))
import section  # noqa: E402


def num(t):
    return '%.0f' % t if t >= 100 else '%.1f' % t if t >= 10 else '%.2g' % t


def load(m, hw, bw, c):
    try:
        with open(os.path.join(W, '%s.%s.%s.%s.json' % (m, hw, bw, c))) as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None


def weights(flags):
    w = [float(v) for v in flags.split()[1:3]]
    return '%g/%g/%g' % (w[0], w[1], max(0.0, round(100 - w[0] - w[1], 2)))


def single(c):
    r = load('opt-175b', 't4', '10Gb', c)
    return num(r['single']['throughput']['total']) if r and r.get('single') else '?'


rows, summary = [], []
for m in ('opt-175b', 'opt-66b', 'opt-30b'):
    for hw, n in (('t4', 4), ('h100', 8)):
        for c in ('f16', 'q4'):
            for bw in ('10Gb', '100Gb'):
                r = load(m, hw, bw, c)
                lead = '| %s | %d x %s | %s | %s' % (m, n, hw, 'f16' if c == 'f16' else '4-bit w + cache', bw.replace('Gb', ' Gb/s'))
                if not r or not r.get('feasible'):
                    rows.append(lead + ' | does not fit: %s' % (r or {}).get('error', '?') + ' |' * 10)
                    continue
                mid = r['stage'][len(r['stage']) // 2]
                t, one = r['throughput'], r['single']
                tone = one['throughput']['total'] if one else None
                rows.append(lead + ' | %s | %d x %d = %d | %s | %s | %.0f%% | %s | %s | **%s** | %s | %s |' % (
                    '/'.join(str(x) for x in sorted(set(r['split']), reverse=True)), r['groups'], r['group'], r['block'],
                    weights(mid['flags']), mid['bottleneck']['decode'], 100 * r['bubble'], num(t['prefill']), num(t['decode']),
                    num(t['total']), num(tone) if tone else 'does not fit', '%.1fx' % (t['total'] / tone) if tone else '-'))
                if m == 'opt-175b' or bw == '10Gb' and c == 'f16':
                    summary.append((m, n, hw, c, bw, t['total'], tone))
head = ('| model | nodes | weights | link | layers per stage | groups x group = block | weights gpu/cpu/disk % '
        '(a middle stage) | its decode bound | bubble | prefill tok/s | decode tok/s | total tok/s | one node total '
        '| speed-up |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|')
ver = subprocess.run([opt, '--version'], capture_output=True, text=True).stdout.strip() or 'opt'
notes = '''
Prompt 512, 32 generated; throughput by FlexGen's definitions over the whole block (all groups).
`opt plan --stages N --nodes-bw BW` (%s): every node is the built-in profile (`t4`: FlexGen's fitted
T4 node, 16 GB GPU, 208 GB RAM, 1.5 TB NVMe; `h100`: an H100 PCIe node, 80 GB GPU, 256 GiB RAM, 3.5
TiB NVMe) with its full budgets; the layers are split as `opt generate` splits them
(`plan_stage_split`); each stage has its own policy (the one shown is a middle stage's) and keeps the
KV cache of all G groups; a group's hidden states cross each link in f32, the sampled tokens come
back from the last stage; links are full-duplex, overlap compute, and their latency is left out. "One
node" is plain `opt plan` on one such node. The speed-up is more than the node count where one node
must stream its weights from disk and N nodes hold them in RAM (or GPU memory): the pipeline's
gain is mostly the aggregate memory. For scale: FlexGen's published OPT-175B throughput on one T4
node (the FlexGen paper, Sheng et al., ICML 2023, Table 2, prompt 512 + 32) is 0.69 token/s (f16,
block 256, weights and cache partly on disk) and 1.12 token/s with 4-bit compression (block 144);
this model predicts %s and %s for one node, so the pipeline figures are this model's, to be
checked against runs. Made by `sh bench/pipeline_plan.sh`.''' % (ver, single('f16'), single('q4'))
table = head + '\n' + '\n'.join(rows) + '\n' + notes
section.put('pipeline-plan', table, os.path.join(here, 'bench', 'RESULTS.md'))
# README: OPT-175B's rows and the f16 10 Gb/s ones of the smaller models, in one short table
lines = ['| model | nodes | weights | link | total tok/s | one node | speed-up |', '|---|---|---|---|---|---|---|']
for m, n, hw, c, bw, t, one in summary:
    lines.append('| %s | %d x %s | %s | %s | **%s** | %s | %s |' % (m, n, hw, 'f16' if c == 'f16' else '4-bit', bw.replace('Gb', ' Gb/s'),
                                                          num(t), num(one) if one else 'does not fit',
                                                          '%.1fx' % (t / one) if one else '-'))
lines.append('\nPredicted by `opt plan --stages N --nodes-bw BW` (prompt 512, 32 generated); the assumptions and '
             'every column: [bench/RESULTS.md](bench/RESULTS.md). Made by `sh bench/pipeline_plan.sh`.')
section.put('pipeline-plan', '\n'.join(lines), os.path.join(here, 'README.md'))
print(table)
EOF
