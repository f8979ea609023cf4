"""OPT's Hugging Face tokenizer, rebuilt from the repository's own tokenizer/vocab.json and
tokenizer/merges.txt with the `tokenizers` library: the reference the tests hold `opt
tokenize` to. It is what facebook/opt-*'s tokenizer.json specifies, component by component:
byte-level BPE over those files (no unknown token, no dropout), the ByteLevel pre-tokenizer
without a prefix space (GPT-2's split pattern), <pad> and </s> as special tokens, and a
post-processor that puts </s> (id 2) before every sequence. Checked equal, id for id, to the
published tokenizer.json on tests/tok_corpus.txt and 3000 random strings before the copy of
that file left the tests."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKDIR = os.path.join(ROOT, 'tokenizer')
DATA = os.path.join(ROOT, 'tests', 'data')


def need_tokenizers():
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        import sys
        sys.exit('the Python package `tokenizers` is the tokenizer reference: run tests/deps.sh '
                 '(or %s -m pip install tokenizers)' % sys.executable)


def opt_tokenizer(model_dir=TOKDIR):
    """The reference Tokenizer for vocab.json and merges.txt in model_dir."""
    need_tokenizers()
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, processors
    t = Tokenizer(models.BPE.from_file(os.path.join(model_dir, 'vocab.json'), os.path.join(model_dir, 'merges.txt')))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    t.decoder = decoders.ByteLevel()
    t.add_special_tokens(['<pad>', '</s>'])
    t.post_processor = processors.TemplateProcessing(single='</s> $A', pair='</s> $A </s> $B', special_tokens=[('</s>', 2)])
    return t
