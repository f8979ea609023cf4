#!/bin/sh
# test_lp.sh [OPT]: checks `OPT lp FILE.mps` (default ./opt) against GLPK's glpsol.
#
# tests/lp_gen.py writes a few hundred LPs whose status (and for many, whose optimum) is known by
# construction. Each one is solved by glpsol and by OPT; statuses must agree with each other and
# with the construction, objectives to 1e-7 relative (|a-b| <= 1e-7 max(1,|a|,|b|)), and OPT's x
# must satisfy every bound to 1e-9 and every row to 1e-8, relative to the row's largest term.
# Then malformed inputs (and 200 seeded mutations of suite files) must give a one-line error
# naming the file (and line), a non-zero exit and no crash; an unknown option likewise. `lp -h`
# and `lp --help` print the usage and exit 0; `lp -` reads the MPS from stdin (named <stdin> in
# messages) and answers as `lp FILE` does. Needs /usr/bin/python3 with numpy and glpsol
# (Debian: python3-numpy, glpk-utils); without glpsol the GLPK comparison is skipped, loudly.
# Takes a few seconds on 2 cores.
set -eu
OPT=${1:-./opt}
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-/usr/bin/python3}
[ -x "$OPT" ] || { echo "test_lp: $OPT is not an executable (usage: tests/test_lp.sh [OPT])"; exit 1; }
"$PY" -c "import numpy" 2>/dev/null || { echo "test_lp: needs $PY with numpy (Debian: python3-numpy)"; exit 1; }
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
"$PY" "$HERE/lp_gen.py" "$TMP/suite"

"$PY" - "$OPT" "$TMP" <<'EOF'
import concurrent.futures, math, os, re, shutil, subprocess, sys

opt, tmp = sys.argv[1], sys.argv[2]
suite = os.path.join(tmp, "suite")
glpk = shutil.which("glpsol")
settled = []  # files whose glpsol verdict needed a second run
INF = math.inf


def parse_mps(path):
    """An independent reader for the free MPS that lp_gen.py writes: rows as [lo, hi]."""
    rows, cols, A, rhs, rng, sec, objconst = {}, {}, {}, {}, {}, None, 0.0
    obj = None
    for line in open(path):
        t = line.split()
        if not t or line[0] == "*":
            continue
        if not line[0].isspace():
            sec = t[0]
            continue
        if sec == "ROWS":
            rows[t[1]] = t[0]
            obj = obj or (t[1] if t[0] == "N" else None)
        elif sec == "COLUMNS":
            c = cols.setdefault(t[0], {"c": 0.0, "lo": 0.0, "hi": INF})
            for r, v in zip(t[1::2], t[2::2]):
                if r == obj:
                    c["c"] = float(v)
                else:
                    A.setdefault(r, {})[t[0]] = float(v)
        elif sec in ("RHS", "RANGES"):
            f = len(t) % 2
            for r, v in zip(t[f::2], t[f + 1::2]):
                if sec == "RHS" and r == obj:
                    objconst = float(v)
                else:
                    (rhs if sec == "RHS" else rng)[r] = float(v)
        elif sec == "BOUNDS":
            k, c = t[0], cols[t[2]]
            v = float(t[3]) if len(t) > 3 else 0.0
            if k == "UP": c["hi"] = v
            elif k == "LO": c["lo"] = v
            elif k == "FX": c["lo"] = c["hi"] = v
            elif k == "FR": c["lo"], c["hi"] = -INF, INF
            elif k == "MI": c["lo"] = -INF
            elif k == "PL": c["hi"] = INF
    bounds = {}
    for r, typ in rows.items():
        if typ == "N":
            continue
        b, R = rhs.get(r, 0.0), rng.get(r)
        lo, hi = {"L": (-INF, b), "G": (b, INF), "E": (b, b)}[typ]
        if R is not None:
            lo, hi = {"L": (b - abs(R), b), "G": (b, b + abs(R)), "E": (b, b + R) if R >= 0 else (b + R, b)}[typ]
        bounds[r] = (lo, hi)
    return bounds, A, cols, objconst


def run_opt(path):
    p = subprocess.run([opt, "lp", path], capture_output=True, text=True, timeout=60)
    out = {"rc": p.returncode, "err": p.stderr.strip(), "x": {}}
    for line in p.stdout.splitlines():
        k, _, v = line.partition(" ")
        if k == "status" and "status" not in out:
            out["status"] = v
        elif k == "objective" and "obj" not in out:
            out["obj"] = float(v)
        else:
            out["x"][k] = float(v)
    return out


def run_glpk(path, *extra):
    """glpsol's verdict: (status, objective, note). The presolver reports 'no dual feasible
    solution' both for unbounded and for infeasible problems and leaves the status UNDEFINED;
    such a case is solved again without it, by the primal simplex, whose phase 1 settles
    feasibility and whose UNBOUNDED then means a ray from a feasible point. Exact arithmetic
    (--exact) is the last resort: it can take minutes on 60 x 60 problems with decimals."""
    base = path + ".glpk" + "".join(extra).replace("-", "")
    try:
        p = subprocess.run(["glpsol", "--freemps", path, "--min", "-o", base + ".out", "-w", base + ".w", *extra],
                           capture_output=True, text=True, timeout=120)
        text = open(base + ".out").read()
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, None, "glpsol failed: %s" % e
    log = p.stdout
    m = re.search(r"^Status:\s+(.*)$", text, re.M)
    st = m.group(1).strip() if m else "?"
    obj = None
    for line in open(base + ".w"):
        f = line.split()
        if f[:2] == ["s", "bas"]:
            obj = float(f[6])
    if "UNDEFINED" in st and "PRIMAL FEASIBLE" in log and "DUAL FEASIBLE" not in log:
        status = "infeasible"  # the presolver proved it
    elif "UNBOUNDED" in st:
        status = "unbounded"
    elif "INFEASIBLE (FINAL)" in st:
        status = "infeasible"
    elif st == "OPTIMAL":
        status = "optimal"
    else:
        status = None
    if status is None and not extra:
        settled.append(path)
        s2, o2, n2 = run_glpk(path, "--nopresol")
        return s2, o2, "glpsol said %r; with --nopresol %s" % (st, n2)
    if status is None and "--exact" not in extra:
        s2, o2, n2 = run_glpk(path, "--exact")
        return s2, o2, "%r; with --exact %s" % (st, n2)
    return status, obj, st


def close(a, b, tol=1e-7):
    return abs(a - b) <= tol * max(1.0, abs(a), abs(b))


def check(name, want, want_obj):
    path = os.path.join(suite, name + ".mps")
    errs = []
    o = run_opt(path)
    if o["rc"] != 0 or "status" not in o:
        return ["opt exited %d: %s" % (o["rc"], o["err"][-300:])]
    st = o["status"]
    if st != want:
        errs.append("status %s, constructed as %s" % (st, want))
    if glpk:
        gst, gobj, note = run_glpk(path)
        if gst != st:
            errs.append("status %s, glpsol %s (%s)" % (st, gst, note))
        elif st == "optimal" and not close(o.get("obj", INF), gobj):
            errs.append("objective %.17g, glpsol %.17g" % (o.get("obj", INF), gobj))
    if st != "optimal":
        return errs
    z = o.get("obj", INF)
    if want_obj is not None and not close(z, want_obj):
        errs.append("objective %.17g, known optimum %.17g" % (z, want_obj))
    bounds, A, cols, objconst = parse_mps(path)
    x = o["x"]
    if set(x) != set(cols):
        return errs + ["printed columns differ from the file's"]
    for j, c in cols.items():
        if not c["lo"] - 1e-9 * max(1, abs(c["lo"])) <= x[j] <= c["hi"] + 1e-9 * max(1, abs(c["hi"])):
            errs.append("%s = %.17g outside [%g, %g]" % (j, x[j], c["lo"], c["hi"]))
    for r, (lo, hi) in bounds.items():
        terms = [a * x[j] for j, a in A.get(r, {}).items()]
        act, tol = math.fsum(terms), 1e-8 * max([1.0] + [abs(t) for t in terms] + [abs(v) for v in (lo, hi) if v not in (INF, -INF)])
        if not lo - tol <= act <= hi + tol:
            errs.append("row %s = %.17g outside [%g, %g]" % (r, act, lo, hi))
    terms = [c["c"] * x[j] for j, c in cols.items()]
    if abs(math.fsum(terms) + objconst - z) > 1e-9 * max([1.0] + [abs(t) for t in terms]):
        errs.append("objective %.17g but c'x = %.17g" % (z, math.fsum(terms) + objconst))
    return errs


cases = [l.split() for l in open(os.path.join(suite, "expect.txt"))]
with concurrent.futures.ThreadPoolExecutor(max(2, os.cpu_count() or 2)) as ex:
    results = list(ex.map(lambda c: check(c[0], c[1], None if c[2] == "-" else float(c[2])), cases))
bad = [(c[0], e) for c, e in zip(cases, results) if e]
for name, e in bad[:20]:
    print("FAIL %s: %s" % (name, "; ".join(e[:3])))
print("lp suite: %d passed / %d total (%s)" % (len(cases) - len(bad), len(cases),
      "%d glpsol verdicts settled by a second run without presolver" % len(settled) if glpk else
      "glpsol not found: checked against the constructions only, GLPK comparison SKIPPED"))

# ---- the MPS reader: features the generated suite does not use ----
good = {  # name: (text, expected objective)
    "objsense_max_crlf": ("* comment\r\nNAME  t\r\nOBJSENSE\r\n    MAX\r\nROWS\r\n N  z\r\n L  c1\r\n"
                          "COLUMNS\r\n x  z  1  c1  1\r\n\ty\tz\t2\tc1\t1\r\nRHS\r\n c1 4\r\n z -3\r\n"
                          "BOUNDS\r\n UP BND x 1\r\n MI BND y\r\n UP BND y 2.5\r\nENDATA\r\n", 1 + 5 - 3),
    "objsense_inline_pl": ("NAME\nOBJSENSE MIN\nROWS\n N z\n G c1\n N free\nCOLUMNS\n x z -1 c1 1\n x free 7\n"
                           " y z 1 c1 1\nRHS\n RHS c1 -2\nBOUNDS\n UP B x 3\n PL B x\n LO B x 1\n UP B x 4\n"
                           " FR B y\nENDATA\n", -4 - 6),
}
fails = 0
for name, (text, want) in good.items():
    path = os.path.join(tmp, name + ".mps")
    open(path, "w", newline="").write(text)
    o = run_opt(path)
    if o["rc"] != 0 or o.get("status") != "optimal" or not close(o.get("obj", INF), want):
        fails += 1
        print("FAIL reader %s: rc %d, %s %s (want optimal %g): %s" % (name, o["rc"], o.get("status"), o.get("obj"), want, o["err"]))

# ---- bad input: a one-line error naming the file (and line), exit 1, nothing on stdout ----
valid = open(os.path.join(suite, "planted_small_01.mps")).read()
hdr = "NAME t\nROWS\n N z\n L c1\nCOLUMNS\n x z 1 c1 1\n"
bad_inputs = {  # name: (text, line the error must name, or None)
    "empty": ("", 0),
    "truncated_half": (valid[: len(valid) // 2], None),
    "truncated_mid_token": (valid[: valid.index("COLUMNS") + 12], None),
    "no_endata": (hdr + "RHS\n c1 1\n", 8),
    "unknown_section": (hdr + "FOO\n", 7),
    "bad_number": (hdr + " y z 1.2.3\nENDATA\n", 7),
    "nan_number": (hdr + " y z nan\nENDATA\n", 7),
    "huge_number": (hdr + " y z 1e999\nENDATA\n", 7),
    "unknown_row_columns": (hdr + " y c2 1\nENDATA\n", 7),
    "unknown_row_rhs": (hdr + "RHS\n RHS c9 1\nENDATA\n", 8),
    "unknown_column_bounds": (hdr + "BOUNDS\n UP BND q 1\nENDATA\n", 8),
    "duplicate_row": ("NAME\nROWS\n N z\n L z\nENDATA\n", 4),
    "bad_row_type": ("NAME\nROWS\n N z\n X c1\nENDATA\n", 4),
    "data_before_section": (" N z\nROWS\nENDATA\n", 1),
    "few_fields": (hdr + " y z\nENDATA\n", 7),
    "many_fields": (hdr + " y z 1 c1 1 c1 1 c1 1\nENDATA\n", 7),
    "integer_marker": (hdr + " M 'MARKER' 'INTORG'\nENDATA\n", 7),
    "binary_bound": (hdr + "BOUNDS\n BV BND x\nENDATA\n", 8),
    "bad_bound_type": (hdr + "BOUNDS\n XX BND x 1\nENDATA\n", 8),
    "noncontiguous_column": (hdr + " y z 1\n x c1 2\nENDATA\n", 8),
    "duplicate_entry": (hdr + " x c1 2\nENDATA\n", 7),
    "range_on_objective": (hdr + "RANGES\n R z 1\nENDATA\n", 8),
    "bad_objsense": ("NAME\nOBJSENSE\n UP\nENDATA\n", 3),
    "text_after_header": ("NAME\nROWS extra\nENDATA\n", 2),
    "binary_garbage": (None, None),
}
for name, (text, line) in bad_inputs.items():
    path = os.path.join(tmp, name + ".mps")
    if text is None:
        open(path, "wb").write(bytes((i * 7919 + 13) % 256 for i in range(4000)))
    else:
        open(path, "w").write(text)
    r = subprocess.run([opt, "lp", path], capture_output=True, timeout=60)
    err = r.stderr.decode(errors="replace").strip()
    why = []
    if not 0 < r.returncode < 128:  # < 0 or >= 128: killed by a signal
        why.append("exit %d" % r.returncode)
    if r.stdout:
        why.append("stdout not empty")
    if len(err.splitlines()) != 1:
        why.append("%d lines on stderr" % len(err.splitlines()))
    if path not in err:
        why.append("file not named")
    if line is not None and "%s:%d:" % (path, line) not in err:
        why.append("line %d not named" % line)
    if why:
        fails += 1
        print("FAIL bad input %s: %s: %s" % (name, ", ".join(why), err[:300]))
for name, argv, must in [("missing_file", [opt, "lp", os.path.join(tmp, "nonexistent.mps")], "nonexistent.mps"),
                         ("directory", [opt, "lp", tmp], tmp),
                         ("no_argument", [opt, "lp"], "usage"),
                         ("two_arguments", [opt, "lp", "a.mps", "b.mps"], "usage"),
                         ("unknown_option", [opt, "lp", "--bogus"], "unknown option '--bogus'"),
                         ("empty_stdin", [opt, "lp", "-"], "<stdin>:0:")]:
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    err = r.stderr.decode(errors="replace").strip()
    if not 0 < r.returncode < 128 or r.stdout or len(err.splitlines()) != 1 or must not in err:
        fails += 1
        print("FAIL bad input %s: exit %d, stderr %r" % (name, r.returncode, err[:300]))

# ---- lp -h / --help: the usage on stdout, exit 0; lp - reads the MPS from stdin ----
for flag in ("-h", "--help"):
    r = subprocess.run([opt, "lp", flag], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    if r.returncode != 0 or not r.stdout.startswith("usage: opt lp") or r.stderr:
        fails += 1
        print("FAIL lp %s: exit %d, stdout %r, stderr %r" % (flag, r.returncode, r.stdout[:80], r.stderr[:200]))
for name in ("planted_small_01", "objsense_max_crlf"):
    path = os.path.join(suite if name.startswith("planted") else tmp, name + ".mps")
    want = subprocess.run([opt, "lp", path], capture_output=True, timeout=60)
    got = subprocess.run([opt, "lp", "-"], stdin=open(path, "rb"), capture_output=True, timeout=60)
    if got.returncode != 0 or got.stdout != want.stdout or not got.stdout.startswith(b"status optimal") or got.stderr:
        fails += 1
        print("FAIL lp - < %s: exit %d, stdout differs from lp FILE's: %r" % (name, got.returncode, got.stdout[:120]))
r = subprocess.run([opt, "lp", "-"], input=(hdr + " y z 1.2.3\nENDATA\n").encode(), capture_output=True, timeout=60)
err = r.stderr.decode(errors="replace").strip()
if r.returncode != 1 or r.stdout or len(err.splitlines()) != 1 or "<stdin>:7:" not in err:
    fails += 1
    print("FAIL lp - with bad input: exit %d, stderr %r (want one line naming <stdin>:7:)" % (r.returncode, err[:200]))

# ---- fuzz: mutated copies of suite files either solve or fail cleanly, never crash ----
import random
rnd = random.Random(7)
files = sorted(f for f in os.listdir(suite) if f.endswith(".mps"))
n_fuzz = 200
for k in range(n_fuzz):
    data = bytearray(open(os.path.join(suite, rnd.choice(files)), "rb").read())
    for _ in range(rnd.randint(1, 4)):
        op, at = rnd.randrange(4), rnd.randrange(len(data))
        if op == 0:
            data[at] = rnd.choice(b" \t\n*-+.e0123456789ABCDEFGXLNUPMIRSQ'\x00\xff")
        elif op == 1:
            del data[at:at + rnd.randint(1, 40)]
        elif op == 2:
            data[at:at] = data[rnd.randrange(len(data)):][:rnd.randint(1, 80)]
        else:
            data = data[:at]
    path = os.path.join(tmp, "fuzz%03d.mps" % k)
    open(path, "wb").write(data)
    r = subprocess.run([opt, "lp", path], capture_output=True, timeout=60)
    err = r.stderr.decode(errors="replace").strip()
    ok = (r.returncode == 0 and r.stdout.startswith(b"status ") and not err) or \
         (0 < r.returncode < 128 and not r.stdout and len(err.splitlines()) == 1 and path in err)
    if not ok:
        fails += 1
        print("FAIL fuzz %s: exit %d, stderr %r" % (path, r.returncode, err[:300]))

n_io = len(good) + len(bad_inputs) + 6 + 2 + 2 + 1 + n_fuzz
print("lp reader, bad input and fuzz: %d passed / %d total" % (n_io - fails, n_io))
sys.exit(1 if bad or fails else 0)
EOF
