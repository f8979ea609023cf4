#!/bin/sh
# test_plan.sh [OPT]: checks `OPT plan` (the cost model and policy search) and `OPT probe`.
#
# tests/plan_check.py runs the command-line checks: plans parse and fit their budgets, and their
# flags evaluate back to the same prediction (--eval); budgets too small are refused naming the
# smallest budget that works, and that budget does work while 0.2 GiB less does not; predicted
# throughput never falls when a budget grows; compression never adds traffic; FlexGen's T4
# scenarios give plausible policies and our model of FlexGen's own policies lands near its
# published throughputs; bad input gives one line on stderr and a non-zero exit; `opt probe`
# writes a probe file that `plan --hw` reads (O_DIRECT and buffered), and cleans up after itself;
# the CPU-only path's terms (on fixed synthetic probe files): a phase-1 probe file without the
# CPU-path keys still plans, a 4-bit cache's slow attention, the tiled GEMM's compute at 8 rows, the CPU
# cost of a cache on disk, the first layer's exposed weight read, --no-overlap never faster.
# One spelling of the policy flags: --eval takes generate's (FlexGen's are refused, naming opt's),
# and plan's flags line runs as printed: `opt bench` and `opt generate -m dummy:SHAPE ... FLAGS`
# exit 0 for CPU-only plans with and without compression, CPU attention, disk shares (a tiny
# --cpu-mem), --pin-weights and --no-overlap; plans for big-memory nodes (one, and pipelines' run
# lines) keep --num-gpu-batches within generate's 64 and pass its option parsing. -m takes SHAPE,
# dummy:SHAPE and a directory alike; --hw - reads the probe file from stdin, probe -o - writes it
# to stdout; --json is one line
# (nothing fitting too); without --hw, plan measures this machine, says so in one stderr line, and
# its plan runs here. Pipelines (--stages): one stage predicts what plain plan does; the split sums
# to the layers, stages are contiguous, stage 0 embeds and the last applies the output, every stage's
# block is the group; the block time, throughput and bubble follow from the stage and link times the
# plan reports by the ring's rules (recomputed here, and the rules by hand on a tiny pipeline); a
# faster link never predicts less; bad --stages and --nodes-bw give one line. Needs /usr/bin/python3
# (standard library only). Takes ~60 s on 2 cores.
set -eu
OPT=${1:-./opt}
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-/usr/bin/python3}
[ -x "$OPT" ] || { echo "test_plan: $OPT is not an executable (usage: tests/test_plan.sh [OPT])"; exit 1; }
exec "$PY" "$HERE/plan_check.py" "$OPT"
