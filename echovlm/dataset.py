"""The prepared dataset: one on-disk format that every data source is turned into and every later step reads.

    DIR/manifest.csv      study, split, patient: one row per study, train rows first, then val, then test
    DIR/reports.jsonl     {"study": ..., "report": ...} per line, in manifest order
    DIR/embeddings.npy    (M, D) float16, all study embeddings stacked in manifest order (memory-mappable)
    DIR/offsets.npy       (N + 1,) int64: study i owns embeddings rows offsets[i]:offsets[i + 1]
    DIR/meta.json         format version, source, settings, input checksums, split recipe, counts, dims

Rows are grouped by split so that a split's embeddings are one contiguous slice of the memmap. No pickles:
everything is readable without running code from the file. A dataset is written into a temporary directory
beside its target and renamed into place only when complete, so a reader never sees half of one; replacing
a dataset (--force) replaces only these files, never what a later step (a tokenizer) or a user put beside them.
"""

import json
import os
import shutil
import time
from hashlib import sha256
from itertools import islice
from pathlib import Path

import numpy as np
import pandas as pd

from echovlm.common import make_temp_dir, replace_dir

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
FILES = ("manifest.csv", "reports.jsonl", "embeddings.npy", "offsets.npy", "meta.json")
# what makes two datasets the same; meta.json also records when and how fast it was written, which may differ
RECIPE_KEYS = ("format_version", "source", "settings", "inputs", "split")
FLOAT16_MAX = float(np.finfo(np.float16).max)


# ------------------------------------------------------------------------------------------------ reading
class PreparedDataset:
    """Read access to a prepared dataset directory (see the module docstring for the layout)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"no prepared dataset at {self.path}: create one with "
                                    f"`python -m scripts.prepare_dataset --source synthetic --out {self.path}`")
        missing = [f for f in FILES if not (self.path / f).is_file()]
        if "meta.json" in missing and len(missing) == len(FILES):
            raise ValueError(f"{self.path} is not a prepared dataset (none of {', '.join(FILES)} is there); "
                             f"point to the directory that scripts.prepare_dataset wrote")
        recreate = f"re-create it with `python -m scripts.prepare_dataset ... --out {self.path} --force`"
        if missing:
            raise ValueError(f"prepared dataset {self.path} is incomplete, missing {', '.join(missing)}; {recreate}")
        try:
            self.meta = json.loads((self.path / "meta.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{self.path / 'meta.json'} is not valid JSON (truncated or edited: {e}); {recreate}") from None
        if not isinstance(self.meta, dict):
            raise ValueError(f"{self.path / 'meta.json'} holds a {type(self.meta).__name__}, not our meta; {recreate}")
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{self.path} has dataset format {self.meta.get('format_version')!r}, this code reads "
                             f"format {FORMAT_VERSION}; {recreate}")
        try:
            manifest = pd.read_csv(self.path / "manifest.csv", dtype=str, keep_default_na=False)
            self._studies = manifest["study"].tolist()
            self._patients = manifest["patient"].tolist()
            split = manifest["split"].to_numpy()
        except (ValueError, KeyError, pd.errors.ParserError) as e:
            raise ValueError(f"{self.path / 'manifest.csv'} cannot be read as study,split,patient rows ({e}); "
                             f"{recreate}") from None
        self._emb = _load_npy(self.path / "embeddings.npy", recreate, mmap_mode="r")
        self._offsets = _load_npy(self.path / "offsets.npy", recreate)
        # the split ranges are derived from the manifest and then checked against everything else
        self._range, start = {}, 0
        for name in SPLITS:
            n = int((split == name).sum())
            if not (split[start:start + n] == name).all():
                raise ValueError(f"{self.path}/manifest.csv: the {name} rows are not contiguous; the file was edited "
                                 f"or damaged, re-create the dataset with --force")
            self._range[name] = (start, start + n)
            start += n
        n = len(self._studies)
        problems = []
        if start != n:
            problems.append(f"manifest has {n - start} rows with a split other than {'/'.join(SPLITS)}")
        if self._emb.ndim != 2 or self._emb.shape[1] == 0:
            problems.append(f"embeddings.npy has shape {self._emb.shape}, expected (rows, dim)")
        if self._offsets.shape != (n + 1,) or self._offsets[0] != 0 or (np.diff(self._offsets) < 1).any():
            problems.append(f"offsets.npy has shape {self._offsets.shape} or is not increasing; expected ({n + 1},)")
        elif self._emb.ndim == 2 and self._offsets[-1] != len(self._emb):
            problems.append(f"offsets.npy ends at row {self._offsets[-1]} but embeddings.npy has {len(self._emb)} rows")
        counts = {name: b - a for name, (a, b) in self._range.items()}
        if self.meta.get("counts") != counts:
            problems.append(f"meta.json counts {self.meta.get('counts')} disagree with manifest.csv {counts}")
        if problems:
            raise ValueError(f"prepared dataset {self.path} is inconsistent: " + "; ".join(problems)
                             + ". Re-create it with scripts.prepare_dataset --force")

    @property
    def embed_dim(self) -> int:
        return int(self._emb.shape[1])

    def _split(self, split: str) -> tuple[int, int]:
        if split not in self._range:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        return self._range[split]

    def studies(self, split: str) -> list[str]:
        a, b = self._split(split)
        return self._studies[a:b]

    def patients(self, split: str) -> list[str]:
        a, b = self._split(split)
        return self._patients[a:b]

    def reports(self, split: str) -> list[str]:
        a, b = self._split(split)
        out = []
        with open(self.path / "reports.jsonl", "rb") as f:
            for i, line in enumerate(islice(f, a, b), start=a):
                try:
                    rec = json.loads(line)
                    ok = isinstance(rec, dict) and isinstance(rec.get("report"), str)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    ok = False
                if not ok:
                    raise ValueError(f"{self.path}/reports.jsonl line {i + 1} is not a {{\"study\", \"report\"}} "
                                     f"record (truncated or edited); re-create the dataset with --force")
                if rec.get("study") != self._studies[i]:
                    raise ValueError(f"{self.path}/reports.jsonl line {i + 1} is study {rec['study']!r}, manifest.csv "
                                     f"says {self._studies[i]!r}; re-create the dataset with --force")
                out.append(rec["report"])
        if len(out) != b - a:
            raise ValueError(f"{self.path}/reports.jsonl has fewer lines than manifest.csv has studies; "
                             f"re-create the dataset with --force")
        return out

    def embedding_block(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(rows, D) float16 memmap of the split's embeddings and its (n + 1,) int64 offsets into it."""
        a, b = self._split(split)
        lo, hi = int(self._offsets[a]), int(self._offsets[b])
        return self._emb[lo:hi], self._offsets[a:b + 1] - lo

    def embeddings(self, split: str) -> list[np.ndarray]:
        """One (k, D) float32 array per study (views of a single float32 copy of the split)."""
        block, offsets = self.embedding_block(split)
        return np.split(np.asarray(block, dtype=np.float32), offsets[1:-1])

    def __repr__(self):
        counts = ", ".join(f"{s} {b - a}" for s, (a, b) in self._range.items())
        return f"PreparedDataset({str(self.path)!r}: {counts}; dim {self.embed_dim})"


def _load_npy(path: Path, recreate: str, mmap_mode=None) -> np.ndarray:
    """np.load that names the file when it is truncated, empty or not a plain array."""
    try:
        array = np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        raise ValueError(f"{path} cannot be read as a .npy array (truncated or damaged: {e}); {recreate}") from None
    if not isinstance(array, np.ndarray):  # an .npz archive under a .npy name
        array.close()
        raise ValueError(f"{path} is an .npz archive, not a .npy array; {recreate}")
    return array


def open_dataset(path: str | os.PathLike) -> PreparedDataset:
    return PreparedDataset(path)


def runs_trained_on(dataset: str | os.PathLike, runs: str | os.PathLike) -> list[Path]:
    """Run directories under `runs` (RUN/config.json or RUN/model/config.json, as base_train and speedrun write
    them) whose recorded dataset is `dataset`. Best effort: an unreadable config is skipped."""
    target, runs = Path(dataset).resolve(), Path(runs)
    if not runs.is_dir():
        return []
    found = []
    for config in sorted([*runs.glob("*/config.json"), *runs.glob("*/*/config.json")]):
        try:
            recorded = json.loads(config.read_text()).get("dataset")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(recorded, str) and recorded and Path(recorded).resolve() == target:
            found.append(config.parent)
    return found


# ------------------------------------------------------------------------------------------------ splitting
def default_split_sizes(n: int) -> tuple[int, int]:
    """(val, test) studies: 10% each for small sets, capped at 10,000 each from 100,000 studies up."""
    size = min(10_000, max(1, round(0.1 * n)))
    return size, size


def assign_splits(patients, seed: int, val_size: int, test_size: int) -> np.ndarray:
    """Split code per study (0 train, 1 val, 2 test), whole patients at a time, deterministic given the seed.

    Patients are shuffled and taken in turn for test, then val, until each holds at least its size, so a
    split may exceed its size by at most one patient's studies; no patient is in two splits.
    """
    n = len(patients)
    if val_size < 1 or test_size < 1:
        raise ValueError(f"val and test need at least 1 study each (got val {val_size}, test {test_size})")
    if val_size + test_size >= n:
        raise ValueError(f"{n} studies cannot give val {val_size} + test {test_size} and leave any to train; "
                         f"lower --val-size/--test-size or add studies")
    codes, uniques = pd.factorize(pd.Series(patients, dtype=object), sort=False)
    per_patient = np.bincount(codes, minlength=len(uniques))
    order = np.random.default_rng(seed).permutation(len(uniques))
    filled = np.cumsum(per_patient[order])
    # a patient joins test if test was still short of its size when this patient came up, likewise for val
    n_test = int(np.searchsorted(filled, test_size) + 1)
    taken = filled[n_test - 1]
    n_val = int(np.searchsorted(filled, taken + val_size) + 1) - n_test
    patient_split = np.zeros(len(uniques), dtype=np.int8)
    patient_split[order[:n_test]] = 2
    patient_split[order[n_test:n_test + n_val]] = 1
    split = patient_split[codes]
    if not (split == 0).any():
        raise ValueError(f"after putting whole patients into val/test nothing is left to train on ({n} studies, "
                         f"{len(uniques)} patients); lower --val-size/--test-size")
    return split


# ------------------------------------------------------------------------------------------------ writing
def fingerprint(path: str | os.PathLike) -> dict:
    """Name, size and sha256 of an input file: meta.json records what a dataset was made from."""
    path = Path(path)
    h = sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": h.hexdigest()}


def existing_status(out: str | os.PathLike, recipe: dict, force: bool) -> str:
    """'new', 'same' (nothing to do) or 'replace' (with force); refuse to touch anything else.

    Refuses a directory that holds a different dataset unless force, and one that is not a dataset at all
    even with force: that is somebody's data, not ours to delete.
    """
    out = Path(out)
    recipe = json.loads(json.dumps(recipe))  # compare as meta.json will hold it (tuples become lists, ...)
    if not out.exists():
        return "new"
    if not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a directory; choose another --out")
    if not any(out.iterdir()):
        return "replace"
    try:
        meta = json.loads((out / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        meta = None
    if not isinstance(meta, dict) or not {"format_version", "source", "counts"} <= set(meta):
        raise FileExistsError(f"--out {out} exists and is not a prepared dataset (no readable meta.json of ours); "
                              f"it is left untouched: choose another --out or move it away yourself")
    if all(meta.get(k) == recipe.get(k) for k in RECIPE_KEYS):
        complete = all((out / f).is_file() for f in FILES)
        if complete:
            return "same"
    if not force:
        differs = [k for k in RECIPE_KEYS if meta.get(k) != recipe.get(k)] or ["files missing"]
        raise FileExistsError(f"--out {out} already holds a different dataset (differs in: {', '.join(differs)}); "
                              f"pass --force to replace it, or choose another --out")
    return "replace"


class DatasetWriter:
    """Stream a dataset into a temporary directory beside `out`; `finish` moves it into place.

    The studies, their patients, splits and embedding counts are known up front (they fix where every row
    goes); reports then arrive one by one in source order and embeddings in blocks, so a 1.2M-study release
    never needs a second copy in memory. Use as a context manager: an exception removes the temporary directory.
    """

    def __init__(self, out, studies, patients, split_codes, rows_per_study, embed_dim: int):
        self.out = Path(out)
        self.studies, self.patients = list(studies), list(patients)
        n = len(self.studies)
        self.split = np.asarray(split_codes, dtype=np.int8)
        self.rows = np.asarray(rows_per_study, dtype=np.int64)
        if not (len(self.patients) == len(self.split) == len(self.rows) == n):
            raise ValueError("studies, patients, split codes and rows per study must have one entry per study")
        if len(set(self.studies)) != n:
            seen, dup = set(), None
            for s in self.studies:
                if s in seen:
                    dup = s
                    break
                seen.add(s)
            raise ValueError(f"study id {dup!r} occurs more than once; study ids must be unique")
        if (self.rows < 1).any():
            raise ValueError(f"study {self.studies[int(np.argmax(self.rows < 1))]!r} has no embeddings")
        # output position of every source study: split by split, source order within a split
        self.order = np.argsort(self.split, kind="stable")
        self.position = np.empty(n, dtype=np.int64)
        self.position[self.order] = np.arange(n)
        self.offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(self.rows[self.order], out=self.offsets[1:])
        self.first_row = self.offsets[self.position]
        self.embed_dim = embed_dim
        self.tmp = make_temp_dir(self.out, "partial")
        self.emb = np.lib.format.open_memmap(self.tmp / "embeddings.npy", mode="w+", dtype=np.float16,
                                             shape=(int(self.offsets[-1]), embed_dim))
        self.parts = [open(self.tmp / f"reports.{name}.jsonl", "w", encoding="utf-8") for name in SPLITS]
        self.n_reports = 0
        self.embedded = np.zeros(n, dtype=bool)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()

    def abort(self):
        for f in self.parts:
            f.close()
        self.emb = None
        shutil.rmtree(self.tmp, ignore_errors=True)

    def put_report(self, report: str):
        """The report of the next study in source order."""
        i = self.n_reports
        if i >= len(self.studies):
            raise ValueError(f"more reports than the {len(self.studies)} studies declared")
        if not isinstance(report, str) or not report.strip():
            raise ValueError(f"study {self.studies[i]!r} (row {i + 1}) has an empty report; drop it or fill it in")
        self.parts[self.split[i]].write(json.dumps({"study": self.studies[i], "report": report}, ensure_ascii=False) + "\n")
        self.n_reports += 1

    def put_embeddings(self, first: int, emb: np.ndarray, offsets: np.ndarray | None = None):
        """Embeddings of source studies first, first+1, ...: emb rows offsets[j]:offsets[j+1] belong to study first+j
        (offsets=None: one row per study)."""
        emb = np.asarray(emb)
        if emb.ndim != 2 or emb.shape[1] != self.embed_dim:
            raise ValueError(f"embeddings of studies from row {first} have shape {emb.shape}; expected (rows, {self.embed_dim})")
        counts = np.ones(len(emb), dtype=np.int64) if offsets is None else np.diff(offsets)
        n = len(counts)
        want = self.rows[first:first + n]
        if len(want) != n or (counts != want).any():
            raise ValueError(f"studies {first}..{first + n - 1}: embedding rows per study do not match those declared")
        bad = ~np.isfinite(emb).all(axis=1)
        if bad.any():
            study = first + int(np.searchsorted(np.cumsum(counts), int(np.argmax(bad)), side="right"))
            raise ValueError(f"study {self.studies[study]!r} has NaN or infinite embedding values; "
                             f"fix or drop it before preparing")
        if np.abs(emb).max(initial=0) > FLOAT16_MAX:
            raise ValueError(f"embedding values reach {np.abs(emb).max():.3g}, beyond float16 (max {FLOAT16_MAX:.0f}); "
                             f"rescale them (e.g. L2-normalise) before preparing")
        # row k of emb goes to first_row[its study] + (k - start of its study within emb)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        dest = np.repeat(self.first_row[first:first + n] - starts, counts) + np.arange(len(emb))
        self.emb[dest] = emb.astype(np.float16)
        self.embedded[first:first + n] = True

    def finish(self, meta: dict) -> PreparedDataset:
        """Write manifest, offsets and meta, then move the directory into place (replacing an old one last)."""
        if self.n_reports != len(self.studies) or not self.embedded.all():
            raise ValueError(f"incomplete: {self.n_reports} reports and {int(self.embedded.sum())} studies' embeddings "
                             f"written of {len(self.studies)} studies declared")
        for f in self.parts:
            f.close()
        with open(self.tmp / "reports.jsonl", "wb") as out:
            for name in SPLITS:
                with open(self.tmp / f"reports.{name}.jsonl", "rb") as part:
                    shutil.copyfileobj(part, out, 1 << 24)
                os.unlink(self.tmp / f"reports.{name}.jsonl")
        self.emb.flush()
        self.emb = None
        np.save(self.tmp / "offsets.npy", self.offsets)
        names = np.array(SPLITS)[self.split[self.order]]
        pd.DataFrame({"study": np.array(self.studies, dtype=object)[self.order], "split": names,
                      "patient": np.array(self.patients, dtype=object)[self.order]}).to_csv(self.tmp / "manifest.csv", index=False)
        counts = {name: int((self.split == k).sum()) for k, name in enumerate(SPLITS)}
        rows = {name: int(self.rows[self.split == k].sum()) for k, name in enumerate(SPLITS)}
        meta = {**meta, "format_version": FORMAT_VERSION, "counts": counts, "rows": rows, "embed_dim": self.embed_dim,
                "embedding_dtype": "float16", "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (self.tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        replace_dir(self.tmp, self.out, FILES)
        return open_dataset(self.out)
