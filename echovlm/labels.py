"""The evaluator's labels of every study of a prepared dataset, computed once and kept beside it.

    DIR/labels/<rules key>.npy    (N, 25) float32 in echovlm.vocabulary.TRAITS order, manifest order (train, val,
                                  test); binary traits 0/1, numbers as read, NaN where the rules left a trait open
    DIR/labels/<rules key>.json   what the array was computed from (traits, rules, reports.jsonl fingerprint, the
                                  array's sha256) and how fast

Reading a report's labels is regular-expression work, ~1.3 ms a ~1,400-character report on one core: ~27 minutes for
the 1.23M-report EchoPrime release on one core, under 2 minutes over 16 (scripts/bench_labels.py). Evaluation, retrieval baselines and the clinical reward
all need the same labels of the same reports, so they are computed once, in parallel, and loaded afterwards.

The key names the rule set ("echovlm-<hash of clinical.py, sentences.py and vocabulary.py>" or "echoprime-<hash of
per_section.json>"), so editing the rules or switching to EchoPrime's never reads another rule set's labels. A cache
is used only when everything in its sidecar still holds; otherwise it is recomputed and the reason printed. Both files
are written by atomic rename, the array first: two processes computing at once (DDP ranks) write identical arrays, and
a reader that sees a new array beside an old sidecar finds the checksum wrong and recomputes rather than trusting it.
"""

import hashlib
import io
import json
import math
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from echovlm import clinical, sentences, vocabulary
from echovlm.clinical import extract_labels
from echovlm.common import atomic_write_bytes, atomic_write_json, print0
from echovlm.dataset import SPLITS, PreparedDataset, fingerprint
from echovlm.vocabulary import TRAITS

CACHE_VERSION = 1
# chunks per worker: enough that the last chunks do not leave the other cores idle for long, few and large enough
# that each chunk's cost (pickling its texts one way and its rows back) stays far below its regex work
CHUNKS_PER_WORKER = 16
MAX_CHUNK = 2048


# ------------------------------------------------------------------ the key


def _short_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


def rules_key(rules=None) -> str:
    """A short stable name for the rule set: "echovlm-<12 hex>" for our rules, "echoprime-<12 hex>" for EchoPrime's.

    Ours hash the source of echovlm/clinical.py, sentences.py and vocabulary.py, so any edit to our rules (or the
    traits) makes a new key; EchoPrime's hash the per_section.json bytes the rules were loaded from (PhraseRules.source).
    """
    if rules is None or rules is clinical.RULES:
        h = hashlib.sha256()
        for module in (clinical, sentences, vocabulary):
            source = Path(module.__file__).read_bytes()
            h.update(f"{module.__name__} {len(source)}\n".encode() + source)
        return f"echovlm-{h.hexdigest()[:12]}"
    source = getattr(rules, "source", None)
    if source is None:
        # an edited clinical.Rules has no file to name it by; a key from our source would mislabel it
        raise TypeError(f"labels are cached for our rules (rules=None) or EchoPrime's (load_echoprime_rules), not a "
                        f"{type(rules).__name__}; call label_matrix directly for a variant")
    try:
        return f"echoprime-{_short_hash(Path(source).read_bytes())}"
    except OSError as e:
        raise FileNotFoundError(f"EchoPrime rules {source} cannot be read to key the label cache ({e}); "
                                f"pass the per_section.json the rules were loaded from") from None


def _rules_source(rules) -> str:
    ours = rules is None or rules is clinical.RULES
    return ("echovlm.clinical (echovlm/clinical.py, echovlm/sentences.py, echovlm/vocabulary.py)" if ours
            else str(Path(rules.source).resolve()))


# ------------------------------------------------------------------ computing


def _rows(texts: list[str], rules) -> np.ndarray:
    out = np.empty((len(texts), len(TRAITS)), dtype=np.float32)
    for i, text in enumerate(texts):
        labels = extract_labels(text, rules)
        out[i] = [np.nan if labels[t] is None else labels[t] for t in TRAITS]
    return out


_worker_rules = None


def _init_worker(rules):
    global _worker_rules
    _worker_rules = rules


def _worker_rows(texts: list[str]) -> np.ndarray:
    return _rows(texts, _worker_rules)


def label_matrix(texts: list[str], rules=None, workers: int | None = None, progress: bool = False) -> np.ndarray:
    """(len(texts), len(TRAITS)) float32 labels in TRAITS order, NaN where extract_labels gave None.

    workers: processes to use (None: every core; 1: this process, no pool). Chunks go out in order and come back
    in order, so the result is the serial loop's bit for bit. Fork where the platform has it: the workers inherit
    the compiled rules instead of unpickling them, and only each chunk's texts cross the pipe.
    """
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    n = len(texts)
    chunk = max(1, min(MAX_CHUNK, math.ceil(n / (workers * CHUNKS_PER_WORKER))))
    chunks = [texts[i:i + chunk] for i in range(0, n, chunk)]
    workers = min(workers, len(chunks))
    bar = tqdm(total=n, unit="report", desc="labels", mininterval=1.0, disable=not progress)
    parts = []
    if workers <= 1:
        for part in chunks:
            parts.append(_rows(part, rules))
            bar.update(len(part))
    else:
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with multiprocessing.get_context(method).Pool(workers, initializer=_init_worker, initargs=(rules,)) as pool:
            for part in pool.imap(_worker_rows, chunks):
                parts.append(part)
                bar.update(len(part))
    bar.close()
    return np.concatenate(parts) if parts else np.empty((0, len(TRAITS)), dtype=np.float32)


# ------------------------------------------------------------------ the cache beside the dataset


def _check(array_path: Path, meta_path: Path, key: str, n: int, reports: Path) -> tuple[str | None, np.ndarray, dict]:
    """(None, labels, sidecar) when the cache holds for these rules and reports, else (why not, None, None): every
    field of the sidecar is checked, and the array against its checksum."""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{meta_path.name} is missing", None, None
    except (OSError, ValueError) as e:
        return f"{meta_path.name} cannot be read ({e})", None, None
    if not isinstance(meta, dict):
        return f"{meta_path.name} holds a {type(meta).__name__}, not our record", None, None
    expected = {"cache_version": CACHE_VERSION, "rules_key": key, "traits": list(TRAITS), "n": n}
    wrong = [k for k, v in expected.items() if meta.get(k) != v]
    if wrong:
        return f"{meta_path.name} records another {', '.join(wrong)} than this code and dataset have", None, None
    recorded = meta.get("reports")
    if not isinstance(recorded, dict):
        return f"{meta_path.name} has no reports.jsonl fingerprint", None, None
    stat = reports.stat()
    if recorded.get("bytes") != stat.st_size:
        return "reports.jsonl changed since the labels were computed (its size differs)", None, None
    # same size and time: the file is untouched; otherwise (copied, touched) its content decides
    if recorded.get("mtime_ns") != stat.st_mtime_ns and recorded.get("sha256") != fingerprint(reports)["sha256"]:
        return "reports.jsonl changed since the labels were computed (its sha256 differs)", None, None
    try:
        data = array_path.read_bytes()
    except OSError as e:
        return f"{array_path.name} cannot be read ({e.strerror or e})", None, None
    if hashlib.sha256(data).hexdigest() != meta.get("labels_sha256"):
        return f"{array_path.name} does not match the checksum in {meta_path.name} (truncated, damaged or replaced)", \
            None, None
    try:
        labels = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        return f"{array_path.name} cannot be read as a .npy array ({e})", None, None
    if not isinstance(labels, np.ndarray) or labels.dtype != np.float32 or labels.shape != (n, len(TRAITS)):
        return f"{array_path.name} is not a ({n}, {len(TRAITS)}) float32 array", None, None
    return None, labels, meta


def dataset_labels(ds: PreparedDataset, rules=None, workers: int | None = None, progress: bool = True) -> np.ndarray:
    """Labels of every study of `ds` in manifest order (train, val, test), from DIR/labels/<rules key>.npy when that
    is valid for these rules and these reports, else computed (workers as in label_matrix) and written there.

    One print0 line says which, and how fast; progress=False hides the progress bar while computing. A dataset
    directory that cannot be written still gets its labels, with a note that they were not kept.
    """
    key = rules_key(rules)
    directory = ds.path / "labels"
    array_path, meta_path = directory / f"{key}.npy", directory / f"{key}.json"
    reports = ds.path / "reports.jsonl"
    n = sum(b - a for a, b in ds._range.values())
    why = ""
    if array_path.exists() or meta_path.exists():
        t0 = time.perf_counter()
        reason, labels, meta = _check(array_path, meta_path, key, n, reports)
        if reason is None:
            print0(f"labels: loaded {array_path} ({n:,} studies, rules {key}) in {time.perf_counter() - t0:.2f} s; "
                   f"computed at {meta.get('reports_per_second')} reports/s on {meta.get('workers')} workers")
            return labels
        why = f"; recomputed because {reason}"
    workers = (os.cpu_count() or 1) if workers is None else workers
    # fingerprinted before reading: should the file change meanwhile, the record is of the old one and the next
    # load recomputes, never the other way round
    stat, content = reports.stat(), fingerprint(reports)
    t0 = time.perf_counter()
    texts = [text for split in SPLITS for text in ds.reports(split)]
    labels = label_matrix(texts, rules, workers, progress=progress)
    seconds = time.perf_counter() - t0
    rate = n / max(seconds, 1e-9)
    done = (f"labels: computed {n:,} studies with rules {key} on {workers} workers in {seconds:.1f} s "
            f"({rate:,.0f} reports/s, {rate / workers:,.0f} per worker){why}")
    data = _npy_bytes(labels)
    meta = {"cache_version": CACHE_VERSION, "rules_key": key, "rules_source": _rules_source(rules),
            "traits": list(TRAITS), "n": n,
            "reports": {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": content["sha256"]},
            "labels_sha256": hashlib.sha256(data).hexdigest(), "workers": workers, "seconds": round(seconds, 2),
            "reports_per_second": round(rate, 1), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        atomic_write_bytes(array_path, data)
        atomic_write_json(meta_path, meta)
    except OSError as e:
        print0(f"{done}; not cached: {directory} cannot be written ({e.strerror or e})")
        return labels
    print0(f"{done}; wrote {array_path}")
    return labels


def _npy_bytes(array: np.ndarray) -> bytes:
    """The .npy file of `array`, built in memory so its checksum goes in the sidecar and one rename publishes it."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def split_labels(ds: PreparedDataset, split: str, rules=None, workers: int | None = None) -> np.ndarray:
    """The rows of dataset_labels that belong to `split`, in the order of ds.studies(split)."""
    a, b = ds._split(split)
    return dataset_labels(ds, rules, workers)[a:b]
