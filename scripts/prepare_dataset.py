"""Turn a data source into the prepared dataset directory that every later step reads (format: echovlm/dataset.py).

    python -m scripts.prepare_dataset --source synthetic --n-studies 20000 --seed 0 --out data/synthetic_n20000_s0
    python -m scripts.prepare_dataset --source echoprime --echoprime-dir ../EchoPrime --out data/echoprime
    python -m scripts.prepare_dataset --source files --reports reports.jsonl --embeddings emb.npy --out data/mine

Sources:
  synthetic  simulated echo studies (echovlm/synthetic.py): offline, deterministic given --seed
  echoprime  the EchoPrime release (python -m scripts.fetch_echoprime downloads it); its report embeddings are
             L2-normalised, its reports decoded from phrase indices
  files      your own: reports.jsonl lines {"study": ..., "report": ..., "patient": optional} and an (N, D)
             embeddings.npy (any D, stored as given), or (M, D) plus --offsets (int64, N + 1) for several per study

Splits are drawn from --seed, whole patients at a time when patient ids are known: synthetic studies have them,
your own files may carry them ("patient" in reports.jsonl), and --patients CSV (study_id,patient_id) gives them
to any source. The EchoPrime release carries none, so without --patients it is split study by study and repeat
studies of one patient may sit in two splits.

Re-running with the same inputs and settings does nothing. A different dataset at --out is replaced only with
--force, and then only the files a dataset consists of: a tokenizer or your own files in --out stay, and the runs
under --runs that were trained on the old version are listed.
"""

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from echovlm import echoprime, synthetic
from echovlm.common import fail, note_leftovers, print0
from echovlm.dataset import (FILES, FORMAT_VERSION, SPLITS, DatasetWriter, assign_splits, default_split_sizes,
                             existing_status, fingerprint, runs_trained_on)

EMBEDDING_BLOCK = 65_536  # studies per block copied into the float16 memmap


@dataclass
class Source:
    name: str
    settings: dict
    inputs: list
    studies: list
    patients: list
    rows_per_study: np.ndarray
    embed_dim: int
    stream: Callable  # stream(writer, progress): feeds every report and embedding to the writer
    by_patient: bool = False


def synthetic_source(args) -> Source:
    n = args.n_studies
    studies, patients = synthetic.study_and_patient_ids(n, args.seed)

    def stream(writer, progress):
        first = 0
        for chunk in synthetic.iter_chunks(n, args.seed, args.signal, args.videos_per_study, args.embed_dim):
            for report in chunk.reports:
                writer.put_report(report)
            writer.put_embeddings(first, chunk.embeddings, chunk.offsets)
            first += len(chunk.studies)
            progress.update(len(chunk.studies))

    settings = {"generator_version": synthetic.GENERATOR_VERSION, "n_studies": n, "seed": args.seed,
                "signal": args.signal, "videos_per_study": args.videos_per_study, "embed_dim": args.embed_dim}
    return Source("synthetic", settings, [], studies, patients, np.full(n, args.videos_per_study, dtype=np.int64),
                  args.embed_dim, stream, by_patient=True)


def echoprime_source(args) -> Source:
    release = echoprime.EchoPrimeRelease(args.echoprime_dir)
    print0(f"checksumming {len(release.files)} EchoPrime files (recorded in meta.json) ...")
    inputs = [fingerprint(p) for p in release.files]
    n = release.n_studies

    def stream(writer, progress):
        print0(f"loading {release.files[2]} ...")
        release.reports_raw  # loads and checks the count before anything is written
        first = 0
        for block in release.iter_embeddings(EMBEDDING_BLOCK):
            writer.put_embeddings(first, block)
            first += len(block)
        for report in release.iter_reports():
            writer.put_report(report)
            progress.update(1)

    return Source("echoprime", {"l2_normalise": True, "release": echoprime.RELEASE}, inputs, release.studies,
                  release.studies, np.ones(n, dtype=np.int64), release.embed_dim, stream)


def read_reports_jsonl(path: Path):
    """Yield (line number, record) of a reports.jsonl, with clear errors for malformed lines."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path} line {lineno} is not UTF-8 text (byte {raw[e.start:e.start + 1]!r} at "
                                 f"column {e.start + 1}); convert the file to UTF-8") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {lineno} is not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or "study" not in rec or "report" not in rec:
                raise ValueError(f"{path} line {lineno}: expected an object with keys \"study\" and \"report\"")
            if not isinstance(rec["report"], str):
                raise ValueError(f"{path} line {lineno}: the \"report\" of study {rec['study']!r} is "
                                 f"{json.dumps(rec['report'])[:40]} ({type(rec['report']).__name__}), not a string")
            if not rec["report"].strip():
                raise ValueError(f"{path} line {lineno}: study {rec['study']!r} has an empty report; drop it or fill it in")
            yield lineno, rec


def load_npy(path: Path, what: str, mmap_mode=None) -> np.ndarray:
    """A plain .npy array, or one line saying why `path` is not one (empty, truncated, an .npz, pickled)."""
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes); expected {what}")
    try:
        array = np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        raise ValueError(f"{path} is not a plain .npy array ({e}); expected {what}") from None
    if not isinstance(array, np.ndarray):  # np.load opens a zip archive whatever its name
        array.close()
        raise ValueError(f"{path} is an .npz archive, not an .npy array; save {what} with numpy.save")
    return array


def files_source(args) -> Source:
    if not args.reports or not args.embeddings:
        raise ValueError("--source files needs --reports FILE and --embeddings FILE")
    paths = [Path(args.reports), Path(args.embeddings)] + ([Path(args.offsets)] if args.offsets else [])
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"{p} does not exist")
    studies, patients, have_patient = [], [], []
    for lineno, rec in read_reports_jsonl(paths[0]):
        studies.append(str(rec["study"]))
        have_patient.append(rec.get("patient") not in (None, ""))
        patients.append(str(rec["patient"]) if have_patient[-1] else studies[-1])
    n = len(studies)
    if n == 0:
        raise ValueError(f"{paths[0]} holds no reports")
    if any(have_patient) and not all(have_patient):
        i = have_patient.index(False)
        raise ValueError(f"{paths[0]}: study {studies[i]!r} has no patient id but others do; give every study one "
                         f"(or none, to split by study)")
    emb = load_npy(paths[1], "an (N, D) embeddings array", mmap_mode="r")
    if emb.ndim != 2 or emb.dtype.kind not in "fiu":
        raise ValueError(f"{paths[1]}: expected a 2-D numeric array (rows, dim), found {emb.dtype} {emb.shape}")
    if emb.shape[1] == 0:
        raise ValueError(f"{paths[1]} has shape {emb.shape}: embeddings of width 0; expected (rows, dim) with dim >= 1")
    if args.offsets:
        offsets = load_npy(paths[2], f"{n + 1} int64 row offsets")
        if offsets.shape != (n + 1,) or offsets.dtype.kind not in "iu":
            raise ValueError(f"{paths[2]}: expected {n + 1} integers (studies + 1), found {offsets.dtype} {offsets.shape}")
        offsets = offsets.astype(np.int64)
        if offsets[0] != 0 or (np.diff(offsets) < 1).any() or offsets[-1] != len(emb):
            raise ValueError(f"{paths[2]} must start at 0, increase by at least 1 per study and end at the "
                             f"{len(emb)} rows of {paths[1]} (it ends at {offsets[-1]})")
    else:
        if len(emb) != n:
            raise ValueError(f"{paths[1]} has {len(emb)} rows but {paths[0]} has {n} reports; they must match row for "
                             f"row (or pass --offsets for several embeddings per study)")
        offsets = np.arange(n + 1, dtype=np.int64)

    def stream(writer, progress):
        for first in range(0, n, EMBEDDING_BLOCK):
            last = min(n, first + EMBEDDING_BLOCK)
            lo, hi = offsets[first], offsets[last]
            writer.put_embeddings(first, np.asarray(emb[lo:hi], dtype=np.float32), offsets[first:last + 1] - lo)
        for _, rec in read_reports_jsonl(paths[0]):
            writer.put_report(rec["report"])
            progress.update(1)

    inputs = [fingerprint(p) for p in paths]
    return Source("files", {"several_per_study": bool(args.offsets)}, inputs, studies, patients,
                  np.diff(offsets), emb.shape[1], stream, by_patient=all(have_patient))


SOURCES = {"synthetic": synthetic_source, "echoprime": echoprime_source, "files": files_source}


def first_duplicate(ids) -> str | None:
    seen = set()
    for x in ids:
        if x in seen:
            return x
        seen.add(x)
    return None


def read_patients(path: Path, studies: list) -> list:
    """Each study's patient from a study_id,patient_id CSV (other columns and extra studies are ignored)."""
    import pandas as pd  # only this path needs it here

    if not path.is_file():
        raise FileNotFoundError(f"--patients {path} does not exist")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except (ValueError, pd.errors.ParserError) as e:
        raise ValueError(f"--patients {path} cannot be read as CSV ({str(e).splitlines()[0]})") from None
    if not {"study_id", "patient_id"} <= set(table.columns):
        raise ValueError(f"--patients {path} needs the columns study_id,patient_id; it has {', '.join(table.columns)}")
    dup = first_duplicate(table["study_id"])
    if dup is not None:
        raise ValueError(f"--patients {path}: duplicate study id {dup!r}; give each study one patient")
    patient_of = dict(zip(table["study_id"], table["patient_id"]))
    missing = [s for s in studies if patient_of.get(s, "") == ""]
    if missing:
        raise ValueError(f"--patients {path} gives no patient for {len(missing):,} of the {len(studies):,} studies "
                         f"(the first: {missing[0]!r}); list every study")
    return [patient_of[s] for s in studies]


def prepare(args) -> int:
    t0 = time.time()
    source = SOURCES[args.source](args)
    n = len(source.studies)
    dup = first_duplicate(source.studies)
    if dup is not None:
        raise ValueError(f"duplicate study id {dup!r} in the {source.name} source; study ids must be unique")
    if args.patients:
        source.patients = read_patients(Path(args.patients), source.studies)
        source.inputs = source.inputs + [fingerprint(args.patients)]
        source.by_patient = True
    elif source.name == "echoprime":
        print0("note: the EchoPrime release carries no patient ids, so it is split study by study: repeat studies "
               "of one patient may sit in two splits. Pass --patients CSV (study_id,patient_id) to split by patient")
    val_size, test_size = default_split_sizes(n)
    val_size = args.val_size if args.val_size is not None else val_size
    test_size = args.test_size if args.test_size is not None else test_size
    recipe = {"format_version": FORMAT_VERSION, "source": source.name, "settings": source.settings,
              "inputs": source.inputs, "split": {"seed": args.seed, "val_size": val_size, "test_size": test_size,
                                                 "by": "patient" if source.by_patient else "study"}}
    out = Path(args.out)
    status = existing_status(out, recipe, args.force)
    if status == "same":
        print0(f"{out}: already prepared from the same inputs and settings; nothing to do")
        return 0
    note_leftovers(out, "prepare_dataset")
    split = assign_splits(source.patients, args.seed, val_size, test_size)
    sizes = ", ".join(f"{name} {int((split == k).sum()):,}" for k, name in enumerate(SPLITS))
    print0(f"{source.name}: {n:,} studies ({sizes}; split by {recipe['split']['by']}, seed {args.seed}), "
           f"embedding dim {source.embed_dim}")
    t1 = time.time()
    with DatasetWriter(out, source.studies, source.patients, split, source.rows_per_study, source.embed_dim) as writer:
        with tqdm(total=n, unit="study", desc="prepare", mininterval=1.0) as progress:
            source.stream(writer, progress)
        seconds = time.time() - t1
        ds = writer.finish({**recipe, "prepare_seconds": round(time.time() - t0, 2),
                            "studies_per_second": round(n / max(seconds, 1e-9), 1)})
    size = sum(f.stat().st_size for f in ds.path.iterdir() if f.is_file())
    print0(f"{'replaced' if status == 'replace' else 'wrote'} {ds.path} ({size / 1e6:.1f} MB): {n:,} studies in "
           f"{seconds:.1f} s, {n / max(seconds, 1e-9):,.0f} studies/s")
    if status == "replace":
        kept = sorted(p.name for p in ds.path.iterdir() if p.name not in FILES)
        if kept:
            print0(f"kept in {out} (not written by prepare_dataset): {', '.join(kept)}; a tokenizer there was made "
                   f"from the old reports: retrain it with `python -m scripts.tok_train --dataset {out} --force`")
        runs = runs_trained_on(out, args.runs)
        if runs:
            print0(f"trained on the old version of {out}, not on what it holds now: {', '.join(map(str, runs))}; "
                   f"their evaluations and reports now read other data, retrain them")
        else:
            print0(f"no run under {args.runs}/ was trained on the old version of {out} (--runs to look elsewhere)")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", choices=sorted(SOURCES), required=True, help="where the studies come from")
    p.add_argument("--out", required=True, help="prepared dataset directory to write")
    p.add_argument("--seed", type=int, default=0, help="split seed (and the synthetic studies' seed)")
    p.add_argument("--val-size", type=int, help="val studies (default 10%% of the studies, at most 10,000)")
    p.add_argument("--test-size", type=int, help="test studies (default 10%% of the studies, at most 10,000)")
    p.add_argument("--force", action="store_true", help="replace a different dataset already at --out (only its "
                   "dataset files; a tokenizer and other files in it stay)")
    p.add_argument("--runs", default="runs", help="where run directories are, to list the runs trained on a "
                   "dataset that --force replaces (default runs)")
    p.add_argument("--patients", help="CSV with columns study_id,patient_id: split whole patients (any source; the "
                   "EchoPrime release has no patient ids of its own)")
    g = p.add_argument_group("synthetic")
    g.add_argument("--n-studies", type=int, default=20_000, help="number of synthetic studies")
    g.add_argument("--signal", type=float, default=synthetic.DEFAULT_SIGNAL,
                   help="0..1: how much of the embedding's variance comes from the clinical state (0 = pure noise)")
    g.add_argument("--videos-per-study", type=int, default=1, help="noisy embeddings per synthetic study")
    g.add_argument("--embed-dim", type=int, default=512, help="synthetic embedding width")
    g = p.add_argument_group("echoprime")
    g.add_argument("--echoprime-dir", default="../EchoPrime", help="EchoPrime checkout holding assets/ and model_data/")
    g = p.add_argument_group("files")
    g.add_argument("--reports", help="reports.jsonl: {\"study\", \"report\", \"patient\" (optional)} per line")
    g.add_argument("--embeddings", help="embeddings .npy, (N, D) or (M, D) with --offsets")
    g.add_argument("--offsets", help="int64 .npy of N + 1 row offsets: study i owns rows offsets[i]:offsets[i+1]")
    args = p.parse_args(argv)
    for flag in ("n_studies", "videos_per_study", "embed_dim"):
        if getattr(args, flag) < 1:
            fail("prepare_dataset", f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.patients and args.source == "synthetic":
        fail("prepare_dataset", "--patients is for the echoprime and files sources; synthetic studies come with "
             "their own patients")
    try:
        return prepare(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # EchoPrimeError is a ValueError
        fail("prepare_dataset", str(e), 2)
    except OSError as e:  # the input was fine; writing failed (disk full, permissions)
        fail("prepare_dataset", f"writing {args.out} failed ({e}); an existing dataset there is left as it was", 1)


if __name__ == "__main__":
    sys.exit(main())
