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

Splits are drawn from --seed, whole patients at a time when patient ids are known. Re-running with the same
inputs and settings does nothing; a different dataset at --out is replaced only with --force.
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
from echovlm.common import print0
from echovlm.dataset import (FORMAT_VERSION, SPLITS, DatasetWriter, assign_splits, default_split_sizes,
                             existing_status, fingerprint)

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
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {lineno} is not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or "study" not in rec or "report" not in rec:
                raise ValueError(f"{path} line {lineno}: expected an object with keys \"study\" and \"report\"")
            if not isinstance(rec["report"], str) or not rec["report"].strip():
                raise ValueError(f"{path} line {lineno}: study {rec['study']!r} has an empty report; drop it or fill it in")
            yield lineno, rec


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
    try:
        emb = np.load(paths[1], mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"{paths[1]} is not a plain .npy array ({e})") from None
    if emb.ndim != 2 or emb.dtype.kind not in "fiu":
        raise ValueError(f"{paths[1]}: expected a 2-D numeric array (rows, dim), found {emb.dtype} {emb.shape}")
    if args.offsets:
        offsets = np.load(paths[2], allow_pickle=False)
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


def prepare(args) -> int:
    t0 = time.time()
    source = SOURCES[args.source](args)
    n = len(source.studies)
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
    leftovers = sorted(out.parent.glob(f".{out.name}.partial-*"))
    if leftovers:  # not deleted here: another prepare_dataset may be writing it right now
        print0(f"note: {', '.join(map(str, leftovers))} left by an interrupted run; delete when no prepare is running")
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
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", choices=sorted(SOURCES), required=True, help="where the studies come from")
    p.add_argument("--out", required=True, help="prepared dataset directory to write")
    p.add_argument("--seed", type=int, default=0, help="split seed (and the synthetic studies' seed)")
    p.add_argument("--val-size", type=int, help="val studies (default 10%% of the studies, at most 10,000)")
    p.add_argument("--test-size", type=int, help="test studies (default 10%% of the studies, at most 10,000)")
    p.add_argument("--force", action="store_true", help="replace a different dataset already at --out")
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
    try:
        return prepare(args)
    except (ValueError, FileNotFoundError, FileExistsError, echoprime.EchoPrimeError) as e:
        print(f"prepare_dataset: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
