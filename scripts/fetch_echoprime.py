"""Fetch the EchoPrime code (pinned commit) and its v1.0.0 release assets onto this machine.

The EchoPrime licence forbids redistribution, so echovlm never ships any of it: every user downloads it here.
Downloads resume after an interruption (HTTP Range into NAME.part), are checked (length, zip CRCs, tensor
shapes, row counts) and only then renamed to their final names, so a partial download is never mistaken for
a complete one. A marker file written last says the whole release is complete and verified.

    python -m scripts.fetch_echoprime --dest ../EchoPrime
    python -m scripts.fetch_echoprime --dest ../EchoPrime --check    # verify only, no network

Exit status: 0 complete, 1 a failure while fetching or a damaged file, 2 bad usage (a --dest that is something
else, --check on a directory without the release), 3 the network is unreachable (speedrun.sh then falls back to
synthetic data). The release's layout (file names, study count, embedding width) is echovlm/echoprime.py's.
"""

import argparse
import csv
import http.client
import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import torch

from echovlm.common import fail
from echovlm.echoprime import (CANDIDATES, EMBED_DIM, EMBEDDING_FILES, MODEL_DATA, PHRASES, PUBLISHED_STUDIES, RELEASE,
                               REPORTS_PKL, STUDIES_CSV)

SCRIPT = "fetch_echoprime"
REPO_URL = "https://github.com/echonet/EchoPrime.git"
PINNED_COMMIT = "45609cd072d1e34d90abdc1ea3bc35bd71e7410b"
RELEASE_URL = f"https://github.com/echonet/EchoPrime/releases/download/{RELEASE}"
MODEL_DATA_ZIP = f"{MODEL_DATA}.zip"
ASSETS = [MODEL_DATA_ZIP] + [f.name for f in EMBEDDING_FILES]  # the embeddings come as assets of their own
MARKER = ".echovlm_fetch_complete.json"
OFFLINE_EXIT = 3


class Offline(Exception):
    pass


class BadDest(ValueError):
    """--dest names something that is not (or not yet) an EchoPrime release: the user's to fix (exit 2)."""


def run_git(*args, cwd=None):
    result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        msg = result.stderr.strip()
        if any(s in msg for s in ("Could not resolve host", "unable to access", "Failed to connect", "Network is unreachable")):
            raise Offline(msg.splitlines()[-1])
        raise RuntimeError(f"git {' '.join(args)} failed: {msg}")
    return result.stdout.strip()


def clone_pinned(dest: Path, repo_url: str, commit: str):
    """Clone into dest.partial, check out the pinned commit, then rename: an interrupted clone is redone, never used."""
    if (dest / ".git").exists():
        head = run_git("rev-parse", "HEAD", cwd=dest)
        if head != commit:
            raise BadDest(f"{dest} is an EchoPrime checkout at {head[:12]}, not the pinned {commit[:12]}. "
                               f"Run `git -C {dest} checkout {commit}` or pass another --dest.")
        print(f"code: {dest} already at {commit[:12]}")
        return
    if dest.exists() and any(p.name != "downloads" for p in dest.iterdir()):
        raise BadDest(f"{dest} exists and is not an EchoPrime git checkout; move it away or pass another --dest")
    partial = dest.with_name(dest.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)  # our own half-finished clone from an interrupted run
    print(f"code: cloning {repo_url} at {commit[:12]}")
    run_git("clone", "--quiet", "--no-checkout", repo_url, str(partial))
    run_git("checkout", "--quiet", commit, cwd=partial)
    if dest.exists():  # holds only downloads/ from an earlier attempt: keep them
        shutil.move(str(dest / "downloads"), str(partial / "downloads"))
        dest.rmdir()
    partial.rename(dest)


BAR = "=" * 78


def print_terms():
    print(BAR)
    print("EchoPrime licence: the code and model data are for ACADEMIC, NON-COMMERCIAL use only and may NOT be")
    print("redistributed. echovlm downloads them onto this machine for you; by continuing you accept the terms")
    print("(the full text follows once the repository is cloned).")
    print(BAR)


def print_licence(dest: Path):
    """The full licence text, from the clone itself, before the release assets are downloaded."""
    files = sorted(dest.glob("LICEN[CS]E*"))
    print(BAR)
    if files:
        print(f"--- {files[0]} ---")
        print(files[0].read_text(errors="replace").strip())
    else:
        print(f"(no LICENSE file found in {dest}: read the terms on the EchoPrime project page)")
    print(BAR)


def download(url: str, out: Path, timeout: float = 60.0, chunk: int = 1 << 20):
    """Resumable download: bytes go to out.part, which is renamed only when its length matches the server's."""
    if out.exists():
        print(f"download: {out.name} present")
        return
    part = out.with_name(out.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # asked for bytes past the end: the .part is already whole
            resp = None
        else:
            raise RuntimeError(f"download of {url} failed: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise Offline(f"{url}: {getattr(e, 'reason', e)}") from None
    if resp is not None:
        with resp:
            if have and resp.status != 206:  # server ignored Range: start over rather than append a second copy
                have = 0
            length = resp.headers.get("Content-Length")
            total = have + int(length) if length is not None else None
            print(f"download: {out.name} ({'resuming at %d bytes, ' % have if have else ''}"
                  f"{'%.1f MB' % (total / 1e6) if total else 'size unknown'})")
            t0, got = time.time(), 0
            with open(part, "ab" if have else "wb") as f:
                while True:
                    try:
                        buf = resp.read(chunk)
                    except (OSError, http.client.HTTPException) as e:
                        raise RuntimeError(f"download of {out.name} broke off after {have + got} bytes ({e}); "
                                           f"run again to resume from {part}") from None
                    if not buf:
                        break
                    f.write(buf)
                    got += len(buf)
            size = part.stat().st_size
            if total is not None and size != total:
                raise RuntimeError(f"download of {out.name} is truncated: {size} of {total} bytes; "
                                   f"run again to resume from {part}")
            print(f"download: {out.name} done, {size / 1e6:.1f} MB at {got / 1e6 / max(time.time() - t0, 1e-9):.1f} MB/s")
    part.rename(out)


def unpack_model_data(zip_path: Path, dest: Path):
    target = dest / MODEL_DATA
    if (dest / CANDIDATES).is_dir():
        return
    try:
        with zipfile.ZipFile(zip_path) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise RuntimeError(f"{zip_path} is corrupt (CRC error in {bad}); delete it and run again")
            tmp = dest / f"{MODEL_DATA}.unpacking"
            if tmp.exists():
                shutil.rmtree(tmp)
            zf.extractall(tmp)
    except zipfile.BadZipFile as e:
        raise RuntimeError(f"{zip_path} is not a valid zip ({e}); delete it and run again") from None
    inner = tmp / MODEL_DATA if (tmp / MODEL_DATA).is_dir() else tmp
    if not (inner / CANDIDATES.name).is_dir():
        raise RuntimeError(f"{zip_path} has no {CANDIDATES}/ inside; is it the EchoPrime {RELEASE} asset?")
    inner.rename(target)
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"unpacked: {target}")


def verify(dest: Path) -> dict:
    """Check what the prepare step relies on; name the file that is wrong."""
    needed = [dest / f for f in (PHRASES, STUDIES_CSV, REPORTS_PKL, *EMBEDDING_FILES)]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise BadDest("EchoPrime release incomplete, missing: " + ", ".join(missing)
                      + "; run `python -m scripts.fetch_echoprime` to fetch it")
    rows = []
    for path in (dest / f for f in EMBEDDING_FILES):
        try:
            t = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise RuntimeError(f"{path} cannot be loaded as a tensor file ({e}); delete it and run again") from None
        if not isinstance(t, torch.Tensor) or t.ndim != 2 or t.shape[1] != EMBED_DIM:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise RuntimeError(f"{path}: expected an (N, {EMBED_DIM}) tensor, found {shape}")
        rows.append(t.shape[0])
    with open(dest / STUDIES_CSV, newline="") as f:
        n_studies = sum(1 for _ in csv.DictReader(f))
    if sum(rows) != n_studies:
        raise RuntimeError(f"embedding rows ({' + '.join(map(str, rows))} = {sum(rows)}) != rows of "
                           f"{dest / STUDIES_CSV} ({n_studies}): one of these files is damaged")
    if n_studies != PUBLISHED_STUDIES:
        print(f"note: {n_studies:,} studies, the release notes state {PUBLISHED_STUDIES:,}")
    return {"studies": n_studies, "embedding_rows": rows, "embed_dim": EMBED_DIM}


def fetch(dest: Path, repo_url=REPO_URL, commit=PINNED_COMMIT, release_url=RELEASE_URL) -> dict:
    print_terms()
    clone_pinned(dest, repo_url, commit)
    print_licence(dest)
    downloads = dest / "downloads"
    downloads.mkdir(exist_ok=True)
    for name in ASSETS:
        download(f"{release_url}/{name}", downloads / name)
    unpack_model_data(downloads / MODEL_DATA_ZIP, dest)
    for f in EMBEDDING_FILES:
        if not (dest / f).exists():
            shutil.copy2(downloads / f.name, dest / f)  # copy, not move: the verified download stays resumable-proof
    info = verify(dest)
    info.update(commit=commit, release=release_url, fetched_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
    (dest / MARKER).write_text(json.dumps(info, indent=2) + "\n")
    return info


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dest", default="../EchoPrime", help="where the EchoPrime checkout and release go (default: %(default)s)")
    p.add_argument("--check", action="store_true", help="only verify an existing download (no network)")
    p.add_argument("--repo-url", default=REPO_URL, help="EchoPrime's git repository (default: %(default)s)")
    p.add_argument("--commit", default=PINNED_COMMIT, help="the commit to check out (default: the pinned %(default)s)")
    p.add_argument("--release-url", default=RELEASE_URL, help="where the release assets are (default: %(default)s)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    dest = Path(args.dest).resolve()
    try:
        if args.check or (dest / MARKER).exists():
            info = verify(dest)
        else:
            info = fetch(dest, args.repo_url, args.commit, args.release_url)
    except Offline as e:
        fail(SCRIPT, f"network unreachable ({e}); run it where github.com can be reached", OFFLINE_EXIT)
    except BadDest as e:
        fail(SCRIPT, str(e), 2)
    except (RuntimeError, OSError) as e:
        fail(SCRIPT, str(e), 1)
    print(f"EchoPrime release at {dest}: complete, {info['studies']:,} studies")
    return 0


if __name__ == "__main__":
    sys.exit(main())
