"""rustbpe (the Rust trainer) against a plain-Python BPE and against tiktoken."""

import random
from collections import Counter

import pytest
import regex  # tiktoken's own dependency; understands the GPT-4 pattern's \p{..}, lookahead, possessives
import rustbpe
import tiktoken

DEFAULT_PATTERN = rustbpe.Tokenizer().get_pattern()
SIMPLE_PATTERN = r" ?[A-Za-z]+| ?[0-9]+| ?[^A-Za-z0-9\s]+|\s+"

CORPORA = {
    "ascii": ["the left ventricle is normal in size", "the right ventricle is mildly dilated",
              "there is no pericardial effusion. the aortic valve is trileaflet."] * 3,
    "unicode": ["café naïve façade", "心脏超声 报告 心脏", "Ärzte prüfen das Herz 🫀🫀 🫀", "Ωμέγα ωμέγα 💓x💓"],
    "digits": ["LVEF 55-60%, PASP 35 mmHg", "Aortic root 3.45 cm; 120/80; 1234567 2024-01-31", "0.9 09 999 1000000"],
    "whitespace": ["a  b   c    d", "\n\n\t x \r\n  y", "     ", "end   \n", "tabs\t\t\tand  spaces  "],
    "repeats": ["aaaaaaa aaaa aa a", "abababab abab", "xxxxxxxxxxxxxxxxxxxxxxxxxxx"],
    "with_empty": ["", "one two three", "", "two three four", ""],
}


def reference_bpe(texts, n_merges, pattern):
    """Textbook BPE: recount every pair each step, merge the most frequent (smallest pair on ties)."""
    chunks = Counter(c for t in texts for c in regex.findall(pattern, t))
    words = Counter({tuple(c.encode("utf-8")): n for c, n in chunks.items()})
    vocab = [bytes([b]) for b in range(256)]
    for new_id in range(256, 256 + n_merges):
        pairs = Counter()
        for w, n in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += n
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], -p[0], -p[1]))
        vocab.append(vocab[best[0]] + vocab[best[1]])
        merged = Counter()
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return vocab


def train(texts, vocab_size, pattern=None, buffer_size=8192):
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(texts), vocab_size, buffer_size=buffer_size, pattern=pattern)
    return tok


def vocab_of(tok):
    ranks = tok.get_mergeable_ranks()
    assert [r for _, r in ranks] == list(range(len(ranks)))
    return [bytes(b) for b, _ in ranks]


def random_text(rng, n):
    pools = ["abcxyz ABC", "0123456789", " \t\n\r  ", ".,;:!?'\"()-/%", "éüßçÅØ", "心脏超声报告", "🫀💓✨", "αβγΩ", "\u00a0\u2003\u0301"]
    return "".join(rng.choice(rng.choice(pools)) for _ in range(n))


@pytest.mark.filterwarnings("ignore:rustbpe. stopped early")
@pytest.mark.parametrize("name", sorted(CORPORA))
@pytest.mark.parametrize("pattern", [SIMPLE_PATTERN, DEFAULT_PATTERN], ids=["simple", "gpt4style"])
def test_merges_match_reference(name, pattern):
    texts = CORPORA[name]
    expected = reference_bpe(texts, 80, pattern)
    # a tiny buffer makes the counts come from several parallel batches
    assert vocab_of(train(texts, 256 + 80, pattern, buffer_size=2)) == expected


def test_merges_match_reference_on_random_text():
    rng = random.Random(0)
    texts = [random_text(rng, rng.randint(0, 60)) for _ in range(200)]
    assert vocab_of(train(texts, 400)) == reference_bpe(texts, 144, DEFAULT_PATTERN)


def test_training_is_deterministic():
    rng = random.Random(1)
    texts = [random_text(rng, 40) for _ in range(300)]
    assert vocab_of(train(texts, 500)) == vocab_of(train(texts, 500, buffer_size=7))


def test_default_pattern_splits_numbers_in_pairs():
    assert regex.findall(DEFAULT_PATTERN, "LVEF 12345") == ["LVEF", " ", "12", "34", "5"]


def test_encode_matches_tiktoken():
    rng = random.Random(2)
    corpus = [random_text(rng, 80) for _ in range(300)] + CORPORA["ascii"] + CORPORA["digits"]
    for pattern in (None, SIMPLE_PATTERN):
        tok = train(corpus, 600, pattern)
        enc = tiktoken.Encoding("t", pat_str=tok.get_pattern(), special_tokens={},
                                mergeable_ranks={bytes(b): r for b, r in tok.get_mergeable_ranks()})
        for text in [random_text(rng, rng.randint(0, 200)) for _ in range(300)] + corpus[:50]:
            assert tok.encode(text) == enc.encode_ordinary(text), repr(text)


def test_early_stop_warns_and_keeps_every_merge():
    with pytest.warns(RuntimeWarning, match="stopped early at vocab size 259"):
        tok = train(["abc abc", "abc"], 1000)
    # ab and bc tie at 3: the smaller pair wins; then abc (3), then " abc" (1); then nothing is left
    assert vocab_of(tok)[256:] == [b"ab", b"abc", b" abc"]
    with pytest.warns(RuntimeWarning, match="stopped early at vocab size 256"):
        assert len(vocab_of(train(["", ""], 300))) == 256


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="at least 256"):
        train(["x"], 100)
    with pytest.raises(ValueError, match="invalid split pattern"):
        train(["x"], 300, pattern="(unclosed")
    with pytest.raises(TypeError, match="iterator of str"):
        train([b"bytes"], 300)
