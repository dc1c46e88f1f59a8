"""The EchoPrime fetcher against a local git repo and a local HTTP server that we control (no internet):
resume after a truncated download, refusal of corrupt files, the completion marker, the offline exit code."""

import http.server
import io
import os
import subprocess
import threading
import zipfile
from pathlib import Path

import pytest
import torch

from scripts import fetch_echoprime as fe


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files with Range support; `truncate_once` makes the next response stop halfway."""
    truncate_once: set = set()

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if path.name in self.truncate_once:
            self.truncate_once.discard(path.name)
            body = body[: len(body) // 2]
            self.close_connection = True
        self.wfile.write(body)


@pytest.fixture
def release(tmp_path):
    """A fake EchoPrime: a git repo with a licence and assets, plus release files served over HTTP."""
    repo = tmp_path / "upstream"
    (repo / "assets").mkdir(parents=True)
    (repo / "LICENSE").write_text("Test licence: academic use only.\n")
    (repo / "assets" / "all_phr.json").write_text('{"Left Ventricle": {"size": ["normal size"]}}')
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    subprocess.run(git + ["init", "-q", str(repo)], check=True)
    subprocess.run(git + ["-C", str(repo), "add", "."], check=True)
    subprocess.run(git + ["-C", str(repo), "commit", "-qm", "x"], check=True)
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()

    served = tmp_path / "served"
    served.mkdir()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("model_data/candidates_data/candidate_studies.csv", "Study\n" + "".join(f"s{i}\n" for i in range(7)))
        zf.writestr("model_data/candidates_data/candidate_reports.pkl", b"not read by the fetcher")
        zf.writestr("model_data/weights/padding.bin", os.urandom(200_000))  # big enough to truncate meaningfully
    (served / "model_data.zip").write_bytes(buf.getvalue())
    torch.save(torch.randn(4, 512), served / "candidate_embeddings_p1.pt")
    torch.save(torch.randn(3, 512), served / "candidate_embeddings_p2.pt")

    handler = lambda *a, **k: RangeHandler(*a, directory=str(served), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {"repo": str(repo), "commit": commit, "url": f"http://127.0.0.1:{server.server_port}", "served": served}
    server.shutdown()


def run(argv) -> int:
    """fe.main's exit status: its return value, or the code of the one-line fail() that stopped it."""
    try:
        return fe.main(argv)
    except SystemExit as e:
        return e.code


def fetch_args(release, dest):
    return ["--dest", str(dest), "--repo-url", release["repo"], "--commit", release["commit"],
            "--release-url", release["url"]]


def test_fetch_resumes_truncated_download_and_marks_complete(release, tmp_path, capsys):
    dest = tmp_path / "EchoPrime"
    RangeHandler.truncate_once = {"model_data.zip"}
    assert run(fetch_args(release, dest)) == 1
    err = capsys.readouterr().err
    assert "model_data.zip" in err and ("truncated" in err or "broke off" in err)
    part = dest / "downloads" / "model_data.zip.part"
    assert part.exists() and not (dest / "downloads" / "model_data.zip").exists()
    assert not (dest / fe.MARKER).exists()
    half = part.stat().st_size

    assert fe.main(fetch_args(release, dest)) == 0
    out = capsys.readouterr().out
    assert f"resuming at {half} bytes" in out
    assert "academic use only" in out  # the licence is shown before downloading
    assert (dest / "downloads" / "model_data.zip").read_bytes() == (release["served"] / "model_data.zip").read_bytes()
    assert (dest / fe.MARKER).exists()
    assert (dest / "model_data" / "candidates_data" / "candidate_embeddings_p2.pt").exists()
    # a second run is a verification only
    assert fe.main(fetch_args(release, dest)) == 0


def test_count_mismatch_names_the_files(release, tmp_path, capsys):
    torch.save(torch.randn(5, 512), release["served"] / "candidate_embeddings_p2.pt")  # 4 + 5 != 7 studies
    assert run(fetch_args(release, tmp_path / "EP")) == 1
    err = capsys.readouterr().err
    assert "candidate_studies.csv" in err and "4 + 5" in err


def test_wrong_width_and_corrupt_zip(release, tmp_path, capsys):
    torch.save(torch.randn(4, 256), release["served"] / "candidate_embeddings_p1.pt")
    assert run(fetch_args(release, tmp_path / "A")) == 1
    assert "candidate_embeddings_p1.pt: expected an (N, 512) tensor" in capsys.readouterr().err

    (release["served"] / "model_data.zip").write_bytes(b"PK\x03\x04 this is not a zip")
    assert run(fetch_args(release, tmp_path / "B")) == 1
    assert "not a valid zip" in capsys.readouterr().err


def test_offline_exit_code(tmp_path, capsys):
    # port 9 on loopback: nothing listens, so the connection is refused at once
    args = ["--dest", str(tmp_path / "EP"), "--repo-url", "http://127.0.0.1:9/EchoPrime.git",
            "--release-url", "http://127.0.0.1:9"]
    assert run(args) == fe.OFFLINE_EXIT
    captured = capsys.readouterr()
    assert "network unreachable" in captured.err
    assert "ACADEMIC, NON-COMMERCIAL" in captured.out  # the terms come before anything is fetched


def test_check_reports_missing_files(tmp_path, capsys):
    # bad input: the directory named is not a release; one line on stderr, exit 2
    assert run(["--dest", str(tmp_path), "--check"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fetch_echoprime: EchoPrime release incomplete, missing") and err.count("\n") == 1


def test_dest_that_is_something_else_is_bad_input(tmp_path, capsys):
    (tmp_path / "EP").mkdir()
    (tmp_path / "EP" / "notes.txt").write_text("mine")
    args = ["--dest", str(tmp_path / "EP"), "--repo-url", "http://127.0.0.1:9/EchoPrime.git", "--release-url", "http://127.0.0.1:9"]
    assert run(args) == 2
    err = capsys.readouterr().err
    assert "is not an EchoPrime git checkout" in err and err.count("\n") == 1
    assert (tmp_path / "EP" / "notes.txt").read_text() == "mine"
