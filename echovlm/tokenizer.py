"""Byte-level BPE tokenizer for reports: trained by our Rust `rustbpe`, run by tiktoken.

rustbpe learns the merges (fast, parallel); tiktoken encodes and decodes with them (fast, multi-threaded
batches). Both pre-split text with the same GPT-4 style regex, numbers in groups of at most 2 digits.
Ids: 0..255 are the single bytes, then one id per merge in the order learned, then the special tokens
<|bos|>, <|eos|>, <|pad|>. Ordinary encoding never produces a special token: a report that contains the
text "<|eos|>" is encoded as the bytes of that text.

`read_corpus` reads a plain corpus file (.txt, one document per line, or .jsonl) for the scripts.
`tokenizer_dir(dataset, vocab_size)` is where a dataset's tokenizer of that size lives, `check_tokens_current`
refuses token files made from other reports than the dataset holds now.

On disk (a directory, no pickle):
    tokenizer.tiktoken  one "<base64 token bytes> <rank>" line per ordinary token (tiktoken's own format)
    tokenizer.json      format marker and version, split pattern, special token ids, sha256 of the ranks file
    tok_stats.json      (tok_train) settings, checksum of the reports it was trained on, compression numbers
    {split}_tokens.npy, {split}_offsets.npy   (tok_train --dataset) every split's reports, encoded
"""

import base64
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import rustbpe
import tiktoken

from echovlm.common import atomic_write_json, atomic_write_text

SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")
FORMAT = "echovlm-tokenizer"
FORMAT_VERSION = 1
RANKS_FILE = "tokenizer.tiktoken"
CONFIG_FILE = "tokenizer.json"
STATS_FILE = "tok_stats.json"
LEGACY_DIR = "tokenizer"  # <dataset>/tokenizer, whatever its size, before directories were keyed by size


class StaleTokensError(ValueError):
    pass


def tokenizer_dir(dataset: str | os.PathLike, vocab_size: int) -> Path:
    """Where tok_train writes, and base_train reads, a dataset's tokenizer of `vocab_size` tokens.

    One directory per size (<dataset>/tokenizer_v2000, ...), so training another size never touches a tokenizer
    that models point at. A <dataset>/tokenizer written before this layout keeps serving the size it was made
    for: runs trained on it, and their resumes, find it where they left it.
    """
    dataset = Path(dataset)
    try:
        stats = json.loads((dataset / LEGACY_DIR / STATS_FILE).read_text())
        if stats["settings"]["vocab_size"] == vocab_size:
            return dataset / LEGACY_DIR
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return dataset / f"tokenizer_v{vocab_size}"


def input_checksum(texts: dict[str, list[str]], settings: dict) -> str:
    """sha256 of the settings and every split's documents in order: what tok_train's outputs are a function of."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for split, docs in texts.items():
        h.update(f"\0split {split} {len(docs)}\0".encode())
        for doc in docs:
            h.update(doc.encode("utf-8", errors="surrogatepass"))
            h.update(b"\0")
    return h.hexdigest()


def check_tokens_current(dataset, tok_dir: str | os.PathLike, splits=("train", "val", "test")):
    """Raise StaleTokensError unless tok_dir's token files were encoded from the reports `dataset` (an open
    PreparedDataset) holds now, in the same order; FileNotFoundError if tok_train never finished there.

    tok_stats.json keeps the checksum of the reports and settings it was made from; the reports are read
    again and hashed the same way (a few seconds for the 1.2M-study release), so an edited, reordered or
    re-prepared reports.jsonl is caught before a model trains on tokens that no longer match it.
    """
    tok_dir = Path(tok_dir)
    retrain = f"`python -m scripts.tok_train --dataset {dataset.path} --out {tok_dir} --force`"
    try:
        stats = json.loads((tok_dir / STATS_FILE).read_text())
        settings, recorded = stats["settings"], stats["input_sha256"]
        retrain = retrain.replace(" --out", f" --vocab-size {int(settings['vocab_size'])} --out")
    except FileNotFoundError:
        raise FileNotFoundError(f"{tok_dir / STATS_FILE} is missing: tok_train never finished in {tok_dir}; "
                                f"run `python -m scripts.tok_train --dataset {dataset.path}`") from None
    except (ValueError, KeyError, TypeError):
        raise StaleTokensError(f"{tok_dir / STATS_FILE} is damaged (no settings or input checksum), so its tokens "
                               f"cannot be checked against {dataset.path}; re-encode with {retrain}") from None
    if input_checksum({s: dataset.reports(s) for s in splits}, settings) != recorded:
        raise StaleTokensError(f"the tokens in {tok_dir} were made from other reports than {dataset.path}/reports.jsonl "
                               f"holds now (edited, reordered or re-prepared after tok_train); re-encode them with "
                               f"{retrain}, or restore the reports they were made from")


def read_corpus(path: str | os.PathLike) -> list[str]:
    """Documents of a .txt (one per line, blank lines skipped) or .jsonl ("report" or "text" field) file."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; pass a corpus file: a .txt (one document per line) or .jsonl file")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    raw = path.read_bytes()
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path} line {line} is not UTF-8 text (byte "
                         f"{raw[e.start:e.start + 1]!r}); convert the file to UTF-8") from None
    # only "\n" ends a line: str.splitlines would also split inside reports at \x0c, \u2028 and the like
    lines = [line.removesuffix("\r") for line in content.split("\n")]
    if path.suffix == ".txt":
        docs = [line for line in lines if line.strip()]
    elif path.suffix == ".jsonl":
        docs = []
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {lineno} is not JSON ({e})") from None
            text = obj.get("report", obj.get("text")) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                raise ValueError(f'{path} line {lineno} has no string "report" or "text" field')
            docs.append(text)
    else:
        raise ValueError(f"{path}: expected a .txt (one document per line) or .jsonl file")
    if not docs:
        raise ValueError(f"{path} holds no documents")
    return docs


class Tokenizer:
    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str):
        n = len(mergeable_ranks)
        if sorted(mergeable_ranks.values()) != list(range(n)):
            raise ValueError("token ranks must be exactly 0..n-1, each used once")
        if any(bytes([b]) not in mergeable_ranks for b in range(256)):
            raise ValueError("every single byte must be a token, or some text could not be encoded")
        self.pattern = pattern
        self.mergeable_ranks = mergeable_ranks
        self.special_ids = {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
        self._enc = tiktoken.Encoding(name="echovlm", pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                      special_tokens=self.special_ids)

    # ------------------------------------------------------------------------------------------ training
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, pattern: str | None = None) -> "Tokenizer":
        """Learn merges on `texts` so the vocabulary, special tokens included, has `vocab_size` tokens
        (fewer, with a RuntimeWarning from rustbpe, when the corpus runs out of pairs to merge)."""
        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} "
                             f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens), got {vocab_size}")
        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(iter(texts), vocab_size - len(SPECIAL_TOKENS), pattern=pattern)
        pairs = bpe.get_mergeable_ranks()
        ranks = {bytes(b): r for b, r in pairs}
        if len(ranks) != len(pairs):
            raise RuntimeError("rustbpe produced two tokens with the same bytes; please report this corpus")
        return cls(ranks, bpe.get_pattern())

    # ------------------------------------------------------------------------------------------ encoding
    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Iterable[str], num_threads: int | None = None) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(list(texts), num_threads=num_threads or os.cpu_count() or 1)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special tokens are dropped, a cut-off multi-byte character becomes U+FFFD."""
        ordinary = [i for i in map(int, ids) if i < len(self.mergeable_ranks)]
        return self._enc.decode(ordinary)

    @property
    def bos_id(self) -> int:
        return self.special_ids["<|bos|>"]

    @property
    def eos_id(self) -> int:
        return self.special_ids["<|eos|>"]

    @property
    def pad_id(self) -> int:
        return self.special_ids["<|pad|>"]

    @property
    def vocab_size(self) -> int:
        return len(self.mergeable_ranks) + len(self.special_ids)

    def token_bytes(self) -> np.ndarray:
        """Bytes per token id, 0 for the special tokens: loss / bytes gives bits per byte, a number
        comparable across vocabularies."""
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for b, r in self.mergeable_ranks.items():
            out[r] = len(b)
        return out

    # ------------------------------------------------------------------------------------------ on disk
    def save(self, directory: str | os.PathLike, overwrite: bool = False):
        directory = Path(directory)
        if (directory / CONFIG_FILE).exists() and not overwrite:
            raise FileExistsError(f"{directory} already holds a tokenizer; pass overwrite=True to replace it")
        by_rank = sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])
        ranks_text = "".join(f"{base64.b64encode(b).decode()} {r}\n" for b, r in by_rank)
        atomic_write_text(directory / RANKS_FILE, ranks_text)
        atomic_write_json(directory / CONFIG_FILE, {
            "format": FORMAT, "format_version": FORMAT_VERSION, "pattern": self.pattern,
            "special_tokens": self.special_ids, "vocab_size": self.vocab_size,
            "ranks_sha256": hashlib.sha256(ranks_text.encode()).hexdigest(),
        })

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Tokenizer":
        directory = Path(directory)
        retrain = f"train one with `python -m scripts.tok_train` (it writes {CONFIG_FILE} and {RANKS_FILE})"
        config_path, ranks_path = directory / CONFIG_FILE, directory / RANKS_FILE
        if not config_path.is_file():
            raise FileNotFoundError(f"no tokenizer in {directory}: {CONFIG_FILE} is missing; {retrain}")
        try:
            config = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{config_path} is not valid JSON ({e}); {retrain}") from None
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise ValueError(f"{config_path} was not written by echovlm (no \"format\": \"{FORMAT}\"); {retrain}")
        if config.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{directory} holds tokenizer format {config.get('format_version')!r}, this code "
                             f"reads format {FORMAT_VERSION}; {retrain}")
        if not ranks_path.is_file():
            raise FileNotFoundError(f"{ranks_path} is missing; {retrain}")
        raw = ranks_path.read_bytes()
        if hashlib.sha256(raw).hexdigest() != config.get("ranks_sha256"):
            raise ValueError(f"{ranks_path} does not match the checksum in {CONFIG_FILE} (edited or truncated); "
                             f"{retrain}")
        ranks = {}
        for lineno, line in enumerate(raw.decode().splitlines(), 1):
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise ValueError(f"{ranks_path} line {lineno} is not '<base64> <rank>': {line[:80]!r}; "
                                 f"{retrain}") from None
        tok = cls(ranks, config["pattern"])
        if tok.special_ids != config.get("special_tokens") or tok.vocab_size != config.get("vocab_size"):
            raise ValueError(f"{config_path} disagrees with {RANKS_FILE} about the vocabulary; {retrain}")
        return tok

    def __repr__(self):
        return f"Tokenizer(vocab_size={self.vocab_size})"
