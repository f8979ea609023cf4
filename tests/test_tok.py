#!/usr/bin/python3
"""Checks `opt tokenize` against Hugging Face's tokenizers library, id for id.

    tests/test_tok.py [--opt ./opt] [--model-dir DIR] [--tokenizer-json FILE]
                      [--vectors FILE] [--random N] [--seed S]

The tokenizer command is `OPT tokenize -m DIR` (text lines in, id lines out,
BOS 2 first) and `OPT tokenize --decode -m DIR` (id lines in, text lines out);
text lines use the escapes \\n, \\t and \\\\. The reference is the `tokenizers`
library with OPT's tokenizer rebuilt from tokenizer/vocab.json and merges.txt
(tests/hf_tok.py; --tokenizer-json takes the published tokenizer.json instead),
with the BOS its post-processor adds.
Checked: the published vectors of hf_opt_expected.json, every line of
tests/tok_corpus.txt, seeded random strings from interesting Unicode ranges,
decode(encode(x)) == x byte for byte, a shuffled merges.txt (merge order kept
exact), the error for invalid UTF-8 input and for corrupt vocab.json and
merges.txt, and that unicode_tab.h is what tests/gen_unicode.py makes of
/usr/share/unicode. --opt is split on spaces, so it may be a command with
arguments. Each check runs the command once over all its lines, so the whole
test takes seconds. Exit status 0 only when every check passed."""
import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import unicodedata

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import hf_tok  # noqa: E402

# The White_Space property: what \s means to Oniguruma (tokenizers) and to the
# regex module (slow GPT2Tokenizer). Python's str.isspace differs (U+001C..1F).
WHITE_SPACE = [0x9, 0xA, 0xB, 0xC, 0xD, 0x20, 0x85, 0xA0, 0x1680] + list(range(0x2000, 0x200B)) + \
    [0x2028, 0x2029, 0x202F, 0x205F, 0x3000]

passed = failed = skipped = 0


def check(ok, what, detail='', n=1, n_bad=None):
    """Counts n checks, n_bad (or all, when not ok) of them failed."""
    global passed, failed
    n_bad = (0 if ok else n) if n_bad is None else n_bad
    passed += n - n_bad
    failed += n_bad
    if n_bad:
        print('FAIL: %s%s' % (what, ('\n  ' + detail) if detail else ''))
    return not n_bad


def escape(text):
    return text.replace('\\', '\\\\').replace('\n', '\\n').replace('\t', '\\t')


def unescape(line):
    """The CLI's escapes: \\n, \\t, \\\\; any other backslash stands for itself."""
    return re.sub(r'\\([nt\\])', lambda m: {'n': '\n', 't': '\t', '\\': '\\'}[m.group(1)], line)


def load_reference(path):
    """tokenizer.json when one is given (--tokenizer-json), else the reference rebuilt from
    the repository's vocab.json and merges.txt (tests/hf_tok.py)."""
    if not path:
        return hf_tok.opt_tokenizer()
    hf_tok.need_tokenizers()
    from tokenizers import Tokenizer
    with open(path, encoding='utf-8') as f:
        d = json.load(f)
    merges = d['model']['merges']
    if merges and isinstance(merges[0], list):  # tokenizers < 0.20 reads only "left right" strings
        d['model']['merges'] = [' '.join(m) for m in merges]
    return Tokenizer.from_str(json.dumps(d))


def run(cmd, lines):
    """Runs cmd once with lines (bytes, one per line) on stdin."""
    p = subprocess.run(cmd, input=b''.join(l + b'\n' for l in lines), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE)
    return p.returncode, p.stdout, p.stderr.decode('utf-8', 'replace')


def opt_encode(args, texts):
    """ids (with BOS) of each text, through one run of `opt tokenize`."""
    rc, out, err = run(args.opt + ['tokenize', '-m', args.model_dir], [escape(t).encode('utf-8') for t in texts])
    if not check(rc == 0, 'opt tokenize exited with %d' % rc, err.strip()):
        return None
    rows = out.split(b'\n')[:-1]
    if not check(len(rows) == len(texts), 'opt tokenize printed %d lines for %d' % (len(rows), len(texts))):
        return None
    return [[int(x) for x in r.split()] for r in rows]


def opt_decode(args, id_rows):
    """decoded bytes of each id list, through one run of `opt tokenize --decode`."""
    rc, out, err = run(args.opt + ['tokenize', '--decode', '-m', args.model_dir],
                       [' '.join(map(str, r)).encode() for r in id_rows])
    if not check(rc == 0, 'opt tokenize --decode exited with %d' % rc, err.strip()):
        return None
    rows = out.split(b'\n')[:-1]
    if not check(len(rows) == len(id_rows), 'opt tokenize --decode printed %d lines for %d' % (len(rows), len(id_rows))):
        return None
    return [re.sub(rb'\\([nt\\])', lambda m: {b'n': b'\n', b't': b'\t', b'\\': b'\\'}[m.group(1)], r) for r in rows]


def compare(args, ref, texts, label):
    """ids equal to the reference, and decode(encode(x)) == x, for every text."""
    got = opt_encode(args, texts)
    if got is None:
        return
    want = [e.ids for e in ref.encode_batch(texts)]
    bad = [i for i in range(len(texts)) if got[i] != want[i]]
    for i in bad[:5]:
        print('  %s %d: %r\n    opt: %s\n    ref: %s' % (label, i, texts[i], got[i][:40], want[i][:40]))
    check(not bad, '%s: %d of %d texts tokenized differently' % (label, len(bad), len(texts)), n=len(texts), n_bad=len(bad))
    back = opt_decode(args, [g[1:] for g in got])
    if back is None:
        return
    bad = [i for i in range(len(texts)) if back[i] != texts[i].encode('utf-8')]
    for i in bad[:5]:
        print('  %s %d: %r decoded to %r' % (label, i, texts[i], back[i]))
    check(not bad, '%s: %d of %d texts did not decode back to themselves' % (label, len(bad), len(texts)),
          n=len(texts), n_bad=len(bad))


def test_vectors(args, ref):
    with open(args.vectors, encoding='utf-8') as f:
        v = json.load(f)
    cases = []  # (text, expected ids, whether they start with BOS 2)
    for e in v['tokenization']:
        ids = e['ids']
        if ids[0] == 0 and ids[-1] == 2:  # RoBERTa-style <s> ... </s> of early tests: the BPE ids inside
            cases.append((e['text'], ids[1:-1], False))
        else:
            cases.append((e['text'], ids, ids[0] == 2))
    for g in v['greedy_generation']:
        prompts, ids = g.get('prompts') or g.get('sentences') or [g.get('prompt')], g.get('derived_prompt_ids', [])
        if ids and isinstance(ids[0], int):
            ids = [ids]
        for text, ids in zip(prompts, ids):
            cases.append((text, ids, True))
    nh = v['inference_no_head']  # <s> ... </s> around the BPE ids of the text shown between them
    inner = nh['input_text_decoded_here']
    if inner.startswith('<s>') and inner.endswith('</s>'):
        cases.append((inner[3:-4], nh['input_ids'][0][1:-1], False))
    lm = v['logits_mean']
    for text, ids, mask in zip(lm['prompts'], lm['derived_input_ids'], lm['derived_attention_mask']):
        cases.append((text, [i for i, m in zip(ids, mask) if m], False))  # right padding dropped
    got = opt_encode(args, [c[0] for c in cases])
    if got is None:
        return
    for (text, ids, bos), g, r in zip(cases, got, ref.encode_batch([c[0] for c in cases])):
        check(r.ids[0] == 2, 'reference adds BOS 2 to %r' % text)
        check((g if bos else g[1:]) == ids, 'vector %r' % text, 'opt: %s\n  expected: %s' % (g, ids))
        check((r.ids if bos else r.ids[1:]) == ids, 'reference agrees with the vector %r' % text)
    # ids published with their decoded text: decoding, </s> included, gives it back
    for g in v['greedy_generation']:
        if 'decoded_here' in g:
            back = opt_decode(args, [g['ids']])
            check(back == [g['decoded_here'].encode()], 'decode %s' % g['ids'], 'opt: %r' % back)
    # the prompts and outputs of the generation tests, against the reference
    texts = [t for g in v['greedy_generation'] for k in ('prompts', 'sentences', 'prompt', 'expected_outputs',
             'expected_output') for t in ([g[k]] if isinstance(g.get(k), str) else g.get(k, []))]
    compare(args, ref, texts, 'generation test text')


def read_corpus(path):
    with open(path, 'rb') as f:
        data = f.read()
    # split on \n only: the corpus holds raw \r, \x0b, \x0c, \x1c.. and U+2028 inside lines
    return [unescape(l.decode('utf-8')) for l in data.split(b'\n')[:-1]]


def table_classes(path):
    """code point -> 'L', 'N' or 'S' from unicode_tab.h (absent: other)."""
    with open(path, encoding='utf-8') as f:
        text = f.read()
    version = re.search(r'#define UNI_VERSION "([^"]*)"', text).group(1)
    spans = {}
    for name, cls in (('uni_letter', 'L'), ('uni_number', 'N'), ('uni_space', 'S')):
        body = re.search(r'%s\[\d+\]\[2\] = \{(.*?)\};' % name, text, re.S).group(1)
        spans[cls] = [(int(a, 16), int(b, 16)) for a, b in re.findall(r'\{0x([0-9a-f]+),0x([0-9a-f]+)\}', body)]
    return version, spans


# Ranges the random strings draw from, with weights: scripts, their digits,
# marks, spaces, emoji parts, number-like symbols, private use and code points
# unassigned in every Unicode version (planes 4..13, noncharacters).
POOLS = [
    (30, [(0x20, 0x7E)]), (12, [(0x20, 0x20)]), (3, [(0x9, 0xD), (0x1C, 0x1F), (0x0, 0x8), (0x7F, 0x7F)]),
    (5, [(0xA0, 0xFF), (0x100, 0x24F)]), (4, [(0x300, 0x36F), (0x1AB0, 0x1ACE), (0x20D0, 0x20F0), (0xFE20, 0xFE2F)]),
    (4, [(c, c) for c in WHITE_SPACE] + [(0x180E, 0x180E), (0x200B, 0x200F), (0x2060, 0x2064), (0xFEFF, 0xFEFF)]),
    (3, [(0x370, 0x3FF), (0x400, 0x4FF), (0x531, 0x58A)]), (3, [(0x591, 0x5F4), (0x600, 0x6FF), (0x750, 0x77F)]),
    (3, [(0x900, 0x97F), (0x980, 0x9FF), (0xE00, 0xE5B), (0xF00, 0xFD4), (0x10A0, 0x10FF), (0x1780, 0x17F9)]),
    (3, [(0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x1100, 0x11FF), (0xFF00, 0xFFEF)]),
    (3, [(0x660, 0x669), (0x6F0, 0x6F9), (0x966, 0x96F), (0xE50, 0xE59), (0xFF10, 0xFF19), (0x1D7CE, 0x1D7FF),
         (0xB2, 0xB3), (0xB9, 0xB9), (0xBC, 0xBE), (0x2070, 0x209C), (0x2150, 0x218B), (0x2460, 0x24FF),
         (0x3007, 0x3007), (0x3021, 0x3029), (0x10100, 0x1013F)]),
    (4, [(0x1F300, 0x1FAFF), (0x2600, 0x27BF), (0x1F3FB, 0x1F3FF), (0x1F1E6, 0x1F1FF), (0x200D, 0x200D),
         (0xFE0F, 0xFE0F), (0xE0020, 0xE007F)]),
    (2, [(0x2000, 0x2BFF), (0x3000, 0x303F), (0xA000, 0xABFF), (0x10000, 0x1FFFF), (0x20000, 0x3134A)]),
    (2, [(0xE000, 0xF8FF), (0xF0000, 0xF00FF), (0x40000, 0xDFFFF), (0xFDD0, 0xFDEF), (0xFFFE, 0xFFFF),
         (0x1FFFE, 0x1FFFF), (0x10FFFE, 0x10FFFF)]),
]
FRAGMENTS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", "\u2019s", "</s>", "<pad>", "<s>", "<unk>",
             "<mask>", "</s", "<pad", "<<pad>>", "  ", "   ", "\n\n", " \n ", "\t\t", "http://x.org/a?b=1", "1,000.5",
             "\U0001F469\u200D\U0001F4BB", "\U0001F1EB\U0001F1F7", "\U0001F44D\U0001F3FD", "e\u0301", "\\", "\\n"]


def random_texts(ref, spans, version, n, seed):
    """n seeded random strings. They avoid the code points whose class depends
    on the Unicode version: those unassigned in Python's unicodedata (but for
    ranges unassigned in every version), those where the reference's class
    differs from Python's, and, only when unicode_tab.h is of another Unicode
    version than Python's, those where it differs from Python's."""
    rng = random.Random(seed)
    pt = ref.pre_tokenizer
    usable, skipped = {}, {'unassigned': set(), 'reference': set(), 'unicode_tab.h': set()}

    def our_class(cp):
        for cls, rs in spans.items():
            lo, hi = 0, len(rs) - 1
            while lo <= hi:
                mid = (lo + hi) // 2
                if cp < rs[mid][0]:
                    hi = mid - 1
                elif cp > rs[mid][1]:
                    lo = mid + 1
                else:
                    return cls
        return 'O'

    def ref_class(c):  # how the reference's pre-tokenizer splits probes around c
        joins = lambda s: len(pt.pre_tokenize_str(s)) == 1
        if joins('a' + c):
            return 'L'
        if joins('1' + c):
            return 'N'
        if joins('!' + c):
            return 'O'
        return 'S' if joins(c + ' ') else '?'

    def py_class(c):
        g = unicodedata.category(c)
        return 'S' if ord(c) in WHITE_SPACE else g[0] if g[0] in 'LN' else 'O'

    stable_unassigned = [(0x40000, 0xDFFFF), (0xFDD0, 0xFDEF), (0xFFFE, 0xFFFF), (0x1FFFE, 0x1FFFF), (0x10FFFE, 0x10FFFF)]

    def why_not(cp):
        c = chr(cp)
        if unicodedata.category(c) == 'Cn' and not any(a <= cp <= b for a, b in stable_unassigned):
            return 'unassigned'
        if py_class(c) != ref_class(c):
            return 'reference'
        if our_class(cp) != py_class(c) and version != unicodedata.unidata_version:
            return 'unicode_tab.h'
        return None

    weights = [w for w, _ in POOLS]
    texts = []
    for k in range(n):
        parts = []
        length = rng.choice([1, 2, 3, 5, 8, 13, 20, 40, 80]) if k % 500 else 3000
        while len(parts) < length:
            if rng.random() < 0.08:
                parts.append(rng.choice(FRAGMENTS))
                continue
            ranges = rng.choices(POOLS, weights)[0][1]
            a, b = rng.choice(ranges)
            cp = rng.randint(a, b)
            if 0xD800 <= cp <= 0xDFFF:
                continue
            if cp not in usable:
                why = why_not(cp)
                usable[cp] = why is None
                if why:
                    skipped[why].add(cp)
            if usable[cp]:
                parts.append(chr(cp) * (rng.choice([1, 1, 1, 2, 7]) if k % 7 == 0 else 1))
        # opt's input drops a CR before a line's LF (CRLF files) and a BOM opening the input,
        # so a line cannot end in CR (nor the first begin with U+FEFF): keep the CR inside
        t = ''.join(parts)
        texts.append(t + '.' if t.endswith('\r') else '.' + t if not texts and t.startswith('\ufeff') else t)
    print('random strings: %d; code points avoided as Unicode-version dependent: %d unassigned in Python %s, '
          '%d classed otherwise by tokenizers %s, %d classed otherwise by unicode_tab.h (Unicode %s)'
          % (len(texts), len(skipped['unassigned']), unicodedata.unidata_version, len(skipped['reference']),
             __import__('tokenizers').__version__, len(skipped['unicode_tab.h']), version))
    return texts


def test_invalid_utf8(args):
    for bad in (b'\xff', b'\xc0\xaf', b'\xed\xa0\x80', b'\xf4\x90\x80\x80', b'caf\xc3', b'\xe2\x82', b'\x80x'):
        rc, out, err = run(args.opt + ['tokenize', '-m', args.model_dir], [b'fine', b'also fine', b'ab ' + bad, b'ok'])
        check(rc != 0 and ':3:' in err and 'invalid UTF-8' in err,
              'invalid UTF-8 %r on line 3: want a non-zero exit and an error naming line 3' % bad,
              'exit %d, stderr %r' % (rc, err))


def test_shuffled_merges(args, texts):
    """A merges.txt in random order, where merges build on later ones (OPT's
    never do): the lowest-rank-first, leftmost-first order must still be
    exactly the reference's."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    with open(os.path.join(args.model_dir, 'merges.txt'), encoding='utf-8') as f:
        lines = f.read().split('\n')
    body = [l for l in lines[1:] if l]
    random.Random(args.seed).shuffle(body)
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(args.model_dir, 'vocab.json'), 'rb') as f, open(os.path.join(d, 'vocab.json'), 'wb') as g:
            g.write(f.read())
        with open(os.path.join(d, 'merges.txt'), 'w', encoding='utf-8') as f:
            f.write(lines[0] + '\n' + '\n'.join(body) + '\n')
        ref = Tokenizer(models.BPE.from_file(os.path.join(d, 'vocab.json'), os.path.join(d, 'merges.txt')))
        ref.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        ref.add_special_tokens(['<pad>', '</s>'])
        saved, args.model_dir = args.model_dir, d
        got = opt_encode(args, texts)
        args.model_dir = saved
    if got is None:
        return
    want = [e.ids for e in ref.encode_batch(texts)]
    bad = [i for i in range(len(texts)) if got[i][1:] != want[i]]
    for i in bad[:3]:
        print('  shuffled merges %d: %r\n    opt: %s\n    ref: %s' % (i, texts[i][:60], got[i][1:30], want[i][:29]))
    check(not bad, 'shuffled merges.txt: %d of %d texts tokenized differently' % (len(bad), len(texts)),
          n=len(texts), n_bad=len(bad))


def test_bad_files(args):
    """A corrupt vocab.json or merges.txt: a one-line error naming the file (and
    the line of merges.txt), exit status 1, no crash. CRLF merges are fine."""
    with open(os.path.join(args.model_dir, 'vocab.json'), encoding='utf-8') as f:
        vocab_text = f.read()
    with open(os.path.join(args.model_dir, 'merges.txt'), encoding='utf-8') as f:
        merges = f.read().split('\n')
    vocab = json.loads(vocab_text)

    def vocab_with(**change):
        d = dict(vocab)
        d.update(change)
        return json.dumps(d, ensure_ascii=False)

    def merges_with(line):  # a bad 4th line (the 3rd merge)
        return '\n'.join(merges[:3] + [line] + merges[4:])

    # (A directory without the two files is not an error: opt falls back to its built-in tokenizer.)
    cases = [  # (what, vocab.json text, merges.txt text, expected in the error)
        ('vocab.json not JSON', '{"a": 1,', '\n'.join(merges), 'vocab.json'),
        ('vocab.json binary', '\x00\x01\x02garbage', '\n'.join(merges), 'vocab.json'),
        ('vocab.json an array', '[1, 2]', '\n'.join(merges), 'vocab.json'),
        ('vocab.json empty object', '{}', '\n'.join(merges), 'vocab.json'),
        ('id a string', vocab_with(hello='5'), '\n'.join(merges), 'vocab.json'),
        ('id negative', vocab_with(**{'\u0120the': -5}), '\n'.join(merges), 'vocab.json'),
        ('id fractional', vocab_with(**{'\u0120the': 5.5}), '\n'.join(merges), 'vocab.json'),
        ('id used twice', vocab_with(**{'\u0120the': 4}), '\n'.join(merges), 'vocab.json'),
        ('token twice', vocab_text[:-1] + ', "\u0120the": 99999}', '\n'.join(merges), 'vocab.json'),
        ('no token for a byte', json.dumps({k: v for k, v in vocab.items() if k != '\u0120'}), '\n'.join(merges),
         'vocab.json'),
        ('merge of one token', vocab_text, merges_with('\u0120t'), 'merges.txt:4'),
        ('merge of three tokens', vocab_text, merges_with('\u0120 t h'), 'merges.txt:4'),
        ('empty merge line', vocab_text, merges_with(''), 'merges.txt:4'),
        ('merge token not in vocab', vocab_text, merges_with('\u0120t zzzzqqq'), 'merges.txt:4'),
        ('merged token not in vocab', vocab_text, merges_with('\u0120the \u0120the'), 'merges.txt:4'),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for k, (what, v, m, want) in enumerate(cases):
            d = os.path.join(tmp, str(k))
            os.mkdir(d)
            for name, text in (('vocab.json', v), ('merges.txt', m)):
                with open(os.path.join(d, name), 'w', encoding='utf-8') as f:
                    f.write(text)
            rc, out, err = run(args.opt + ['tokenize', '-m', d], [b'Hello world'])
            lines = err.strip().split('\n')
            check(rc == 1 and want in err and len(lines) == 1, '%s: want exit 1 and one line naming %s' % (what, want),
                  'exit %d, stderr %r' % (rc, err))
        d = os.path.join(tmp, 'crlf')
        os.mkdir(d)
        with open(os.path.join(d, 'vocab.json'), 'w', encoding='utf-8') as f:
            f.write(vocab_text)
        with open(os.path.join(d, 'merges.txt'), 'w', encoding='utf-8', newline='') as f:
            f.write('\r\n'.join(merges))
        rc, out, err = run(args.opt + ['tokenize', '-m', d], [b'Hello world'])
        check(rc == 0 and out == b'2 31414 232\n', 'merges.txt with CRLF line ends', 'exit %d, %r %r' % (rc, out, err))


def test_unicode_tab():
    global skipped
    ucd = '/usr/share/unicode'
    tab = os.path.join(ROOT, 'unicode_tab.h')
    if not os.path.exists(os.path.join(ucd, 'UnicodeData.txt')):
        print('skipped: unicode_tab.h freshness (%s is absent; apt-get install unicode-data)' % ucd)
        skipped += 1
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, 'unicode_tab.h')
        subprocess.run([sys.executable, os.path.join(HERE, 'gen_unicode.py'), '--ucd', ucd, '-o', out], check=True)
        new, old = open(out, encoding='utf-8').read(), open(tab, encoding='utf-8').read()
    ver = lambda s: re.search(r'#define UNI_VERSION "([^"]*)"', s).group(1)
    if ver(new) != ver(old):
        print('skipped: unicode_tab.h is from Unicode %s, %s has %s' % (ver(old), ucd, ver(new)))
        skipped += 1
        return
    check(new == old, 'unicode_tab.h is not what tests/gen_unicode.py writes: regenerate it')


def main():
    global passed, failed
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--opt', default=os.path.join(ROOT, 'opt'), help='the opt binary (may be a command with arguments)')
    ap.add_argument('--model-dir', default=hf_tok.TOKDIR, help='a directory with vocab.json and merges.txt')
    ap.add_argument('--tokenizer-json', help="OPT's tokenizer.json as the reference (default: the same "
                    'tokenizer rebuilt from the repository\'s vocab.json and merges.txt)')
    ap.add_argument('--vectors', default=os.path.join(hf_tok.DATA, 'hf_opt_expected.json'))
    ap.add_argument('--corpus', default=os.path.join(HERE, 'tok_corpus.txt'))
    ap.add_argument('--random', type=int, default=3000, help='random strings')
    ap.add_argument('--seed', type=int, default=1)
    args = ap.parse_args()
    args.opt = args.opt.split()
    for f in (args.tokenizer_json, args.vectors):
        if f and not os.path.exists(f):
            sys.exit('test_tok: %s not found' % f)
    ref = load_reference(args.tokenizer_json)

    test_vectors(args, ref)
    corpus = read_corpus(args.corpus)
    compare(args, ref, corpus, 'corpus line')
    version, spans = table_classes(os.path.join(ROOT, 'unicode_tab.h'))
    texts = random_texts(ref, spans, version, args.random, args.seed)
    compare(args, ref, texts, 'random string')
    test_shuffled_merges(args, corpus + texts[:1000])
    test_invalid_utf8(args)
    test_bad_files(args)
    test_unicode_tab()
    print('%d passed, %d failed%s' % (passed, failed, ', %d skipped' % skipped if skipped else ''))
    sys.exit(1 if failed else 0)


if __name__ == '__main__':
    main()
