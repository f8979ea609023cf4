#!/usr/bin/python3
"""bench/section.py KEY [RESULTS.md] < SECTION.md: puts stdin into RESULTS.md between the
markers `<!-- BEGIN KEY -->` and `<!-- END KEY -->`, replacing what was there (or appending),
so that every benchmark script owns one section and leaves the others alone."""
import os
import sys


def put(key, text, path):
    begin, end = '<!-- BEGIN %s' % key, '<!-- END %s -->' % key
    block = '<!-- BEGIN %s: edits here are overwritten -->\n%s\n%s\n' % (key, text.strip('\n'), end)
    old = open(path).read() if os.path.exists(path) else '# Benchmark results\n'
    if begin in old and end in old:
        a, z = old.index(begin), old.index(end) + len(end)
        new = old[:a] + block.rstrip('\n') + old[z:]
    else:
        new = old.rstrip('\n') + '\n\n' + block
    with open(path, 'w') as f:
        f.write(new)


if __name__ == '__main__':
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    here = os.path.dirname(os.path.abspath(__file__))
    put(sys.argv[1], sys.stdin.read(), sys.argv[2] if len(sys.argv) > 2 else os.path.join(here, 'RESULTS.md'))
