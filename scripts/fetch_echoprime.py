"""Fetch the EchoPrime code (pinned commit) and its v1.0.0 release assets onto this machine.

The EchoPrime licence forbids redistribution, so echovlm never ships any of it: every user downloads it here.
Downloads resume after an interruption (HTTP Range into NAME.part), are checked (length, zip CRCs, tensor
shapes, row counts) and only then renamed to their final names, so a partial download is never mistaken for
a complete one. A marker file written last says the whole release is complete and verified.

    python -m scripts.fetch_echoprime --dest ../EchoPrime
    python -m scripts.fetch_echoprime --dest ../EchoPrime --check    # verify only, no network

Exit code 3 means the network is unreachable (speedrun.sh then falls back to synthetic data).
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

REPO_URL = "https://github.com/echonet/EchoPrime.git"
PINNED_COMMIT = "45609cd072d1e34d90abdc1ea3bc35bd71e7410b"
RELEASE_URL = "https://github.com/echonet/EchoPrime/releases/download/v1.0.0"
EMBEDDING_FILES = ["candidate_embeddings_p1.pt", "candidate_embeddings_p2.pt"]
ASSETS = ["model_data.zip"] + EMBEDDING_FILES
PUBLISHED_STUDIES = 1_230_676  # the count the release's authors state; a different count is reported, not fatal
EMBED_DIM = 512
MARKER = ".echovlm_fetch_complete.json"
OFFLINE_EXIT = 3


class Offline(Exception):
    pass


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
            raise RuntimeError(f"{dest} is an EchoPrime checkout at {head[:12]}, not the pinned {commit[:12]}. "
                               f"Run `git -C {dest} checkout {commit}` or pass another --dest.")
        print(f"code: {dest} already at {commit[:12]}")
        return
    if dest.exists() and any(p.name != "downloads" for p in dest.iterdir()):
        raise RuntimeError(f"{dest} exists and is not an EchoPrime git checkout; move it away or pass another --dest")
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
    target = dest / "model_data"
    if (target / "candidates_data").is_dir():
        return
    try:
        with zipfile.ZipFile(zip_path) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise RuntimeError(f"{zip_path} is corrupt (CRC error in {bad}); delete it and run again")
            tmp = dest / "model_data.unpacking"
            if tmp.exists():
                shutil.rmtree(tmp)
            zf.extractall(tmp)
    except zipfile.BadZipFile as e:
        raise RuntimeError(f"{zip_path} is not a valid zip ({e}); delete it and run again") from None
    inner = tmp / "model_data" if (tmp / "model_data").is_dir() else tmp
    if not (inner / "candidates_data").is_dir():
        raise RuntimeError(f"{zip_path} has no model_data/candidates_data/ inside; is it the EchoPrime v1.0.0 asset?")
    inner.rename(target)
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"unpacked: {target}")


def verify(dest: Path) -> dict:
    """Check what the prepare step relies on; name the file that is wrong."""
    cand = dest / "model_data" / "candidates_data"
    needed = [dest / "assets" / "all_phr.json", cand / "candidate_studies.csv", cand / "candidate_reports.pkl"]
    needed += [cand / name for name in EMBEDDING_FILES]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise RuntimeError("EchoPrime release incomplete, missing: " + ", ".join(missing)
                           + "; run `python -m scripts.fetch_echoprime` to fetch it")
    rows = []
    for name in EMBEDDING_FILES:
        try:
            t = torch.load(cand / name, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise RuntimeError(f"{cand / name} cannot be loaded as a tensor file ({e}); delete it and run again") from None
        if not isinstance(t, torch.Tensor) or t.ndim != 2 or t.shape[1] != EMBED_DIM:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise RuntimeError(f"{cand / name}: expected an (N, {EMBED_DIM}) tensor, found {shape}")
        rows.append(t.shape[0])
    with open(cand / "candidate_studies.csv", newline="") as f:
        n_studies = sum(1 for _ in csv.DictReader(f))
    if sum(rows) != n_studies:
        raise RuntimeError(f"embedding rows ({' + '.join(map(str, rows))} = {sum(rows)}) != rows of "
                           f"{cand / 'candidate_studies.csv'} ({n_studies}): one of these files is damaged")
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
    unpack_model_data(downloads / "model_data.zip", dest)
    cand = dest / "model_data" / "candidates_data"
    for name in EMBEDDING_FILES:
        if not (cand / name).exists():
            shutil.copy2(downloads / name, cand / name)  # copy, not move: the verified download stays resumable-proof
    info = verify(dest)
    info.update(commit=commit, release=release_url, fetched_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
    (dest / MARKER).write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dest", default="../EchoPrime", help="where the EchoPrime checkout and release go")
    p.add_argument("--check", action="store_true", help="only verify an existing download (no network)")
    p.add_argument("--repo-url", default=REPO_URL)
    p.add_argument("--commit", default=PINNED_COMMIT)
    p.add_argument("--release-url", default=RELEASE_URL)
    args = p.parse_args(argv)
    dest = Path(args.dest).resolve()
    try:
        if args.check or (dest / MARKER).exists():
            info = verify(dest)
            print(f"EchoPrime release at {dest}: complete, {info['studies']:,} studies")
            return 0
        info = fetch(dest, args.repo_url, args.commit, args.release_url)
        print(f"EchoPrime release at {dest}: complete, {info['studies']:,} studies")
        return 0
    except Offline as e:
        print(f"fetch_echoprime: network unreachable ({e})", file=sys.stderr)
        return OFFLINE_EXIT
    except RuntimeError as e:
        print(f"fetch_echoprime: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
