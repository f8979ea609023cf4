"""tests/harness.py: what the Python tests share. A check prints one line ("  ok    NAME",
or "  FAIL  NAME" with its details indented under it, or "  skip  NAME: why") and is counted;
summary() prints the last line, "NAME: N passed, M failed, K skipped", that tests/run.sh
shows, and gives the exit status. run() runs a command with a time limit and never raises."""
import os
import subprocess
import sys
import time

passed = failed = skipped = 0
_sections = []  # [name, start, seconds]


def check(ok, what, detail=''):
    """One check; returns ok."""
    global passed, failed
    if ok:
        passed += 1
        print('  ok    %s' % what)
    else:
        failed += 1
        print('  FAIL  %s' % what)
        for line in str(detail).strip().split('\n')[:12]:
            if line:
                print('          %s' % line)
    sys.stdout.flush()
    return ok


def skip(what, why):
    global skipped
    skipped += 1
    print('  skip  %s: %s' % (what, why))
    sys.stdout.flush()


def section(name):
    """Starts a section of checks; summary() prints the seconds each took."""
    now = time.time()
    if _sections:
        _sections[-1][2] = now - _sections[-1][1]
    _sections.append([name.split(':')[0], now, 0.0])
    print('[%s]' % name)
    sys.stdout.flush()


def summary(name, t0=None):
    """Prints the summary line; returns the exit status (1 when a check failed)."""
    if _sections:
        _sections[-1][2] = time.time() - _sections[-1][1]
        print('seconds per section: ' + ', '.join('%s %.0f' % (n, s) for n, _, s in _sections))
    took = ' in %.0f s' % (time.time() - t0) if t0 is not None else ''
    print('%s: %d passed, %d failed, %d skipped%s' % (name, passed, failed, skipped, took))
    sys.stdout.flush()
    return 1 if failed else 0


def run_sections(tests, only, *args):
    """Runs [(name, fn)] (those named in the set only, when given) as fn(*args), each
    timed; an exception in one is a failure of that section, not the end of the suite."""
    for name, fn in tests:
        if only and name not in only:
            continue
        t1 = time.time()
        try:
            fn(*args)
        except Exception as x:
            import traceback
            check(False, '%s raised %s: %s' % (name, type(x).__name__, x), traceback.format_exc()[-1200:])
        print('        (%.1f s)' % (time.time() - t1))


class Run:
    """The result of one command: rc is its exit status, or a string saying why there is none."""

    def __init__(self, args, rc, out, err, dt=0.0):
        self.args, self.rc, self.out, self.err, self.dt = args, rc, out, err, dt

    @property
    def text(self):
        return self.out.decode('utf-8', 'replace')

    @property
    def errtext(self):
        return self.err.decode('utf-8', 'replace')

    @property
    def lines(self):
        """stdout as text lines (without the final newline)."""
        t = self.text
        return t.split('\n')[:-1] if t.endswith('\n') else t.split('\n') if t else []

    def describe(self):
        return '%s -> exit %s\nstderr: %s' % (' '.join(self.args), self.rc, self.errtext.strip()[:800])

    def tail(self, n=6):
        return 'exit %s; stderr: %s' % (self.rc, '\n'.join(self.errtext.strip().split('\n')[-n:]))


def run(argv, stdin=b'', env=None, timeout=60, stdout=subprocess.PIPE, preexec=None, drop=('OPT_SIMD',)):
    """Runs argv (stdin: bytes, str or a list of lines) with os.environ less `drop`, plus env."""
    if isinstance(stdin, list):
        stdin = ''.join(l + '\n' for l in stdin)
    if isinstance(stdin, str):
        stdin = stdin.encode('utf-8')
    e = {k: v for k, v in os.environ.items() if k not in drop}
    e.update(env or {})
    t0 = time.time()
    try:
        p = subprocess.run(argv, input=stdin, stdout=stdout, stderr=subprocess.PIPE, env=e, timeout=timeout, preexec_fn=preexec)
        return Run(argv, p.returncode, p.stdout or b'', p.stderr, time.time() - t0)
    except OSError as x:  # e.g. the binary is being rebuilt
        return Run(argv, 'could not run %s: %s' % (argv[0], x), b'', b'', time.time() - t0)
    except subprocess.TimeoutExpired as x:
        return Run(argv, 'hung (killed after %ds)' % timeout, x.stdout or b'', x.stderr or b'', time.time() - t0)


def fixture(path, opt, args):
    """path, made by opt(args) (a function running the binary) unless it exists already."""
    if not os.path.exists(path):
        r = opt(args)
        if r.rc != 0:
            raise SystemExit('fixture: opt %s failed: %s' % (' '.join(args), r.tail()))
    return path


def reap(p, timeout=20):
    """Waits for process p (killing it after timeout) and returns its stderr as text."""
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    err = p.stderr.read().decode('utf-8', 'replace')
    p.stderr.close()
    return err


def interrupt(p, sig, ready, timeout=20, settle=0.0):
    """Sends sig to process p once ready() holds (polled; then settle seconds more), then reaps
    it. Returns (whether p was still running when signalled, its stderr)."""
    t0 = time.time()
    while time.time() - t0 < timeout and p.poll() is None and not ready():
        time.sleep(0.005)
    time.sleep(settle)
    running = p.poll() is None
    if running:
        p.send_signal(sig)
    return running, reap(p, timeout)
