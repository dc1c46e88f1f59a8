"""echovlm.tokenizer (rustbpe training + tiktoken encoding, save/load) and the tok_train / tok_eval scripts."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from echovlm.tokenizer import (CONFIG_FILE, RANKS_FILE, StaleTokensError, Tokenizer, check_tokens_current,
                               read_corpus, tokenizer_dir)

ROOT = Path(__file__).resolve().parents[1]

SECTIONS = ["Left Ventricle", "Right Ventricle", "Mitral Valve", "Aortic Valve", "Pericardium"]
FINDINGS = ["Normal size and function.", "Mildly dilated.", "LVEF 55-60%.", "Moderate regurgitation.",
            "No effusion.", "Severe stenosis, mean gradient 42 mmHg.", "Trace regurgitation."]


def make_reports(n, seed=0):
    rng = random.Random(seed)
    return ["\n".join(f"{s}: {rng.choice(FINDINGS)} {rng.choice(FINDINGS)}" for s in SECTIONS) for _ in range(n)]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(make_reports(200), 350)


def random_unicode(rng, n):
    # any code point but the surrogates, which a Python str can hold but UTF-8 cannot encode
    cps = [rng.choice([rng.randint(0, 0x7F), rng.randint(0x80, 0xD7FF), rng.randint(0xE000, 0x10FFFF)])
           for _ in range(n)]
    return "".join(map(chr, cps))


def test_ids_layout(tok):
    assert tok.vocab_size == 350
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (347, 348, 349)
    tb = tok.token_bytes()
    assert tb.dtype == np.int64 and tb.shape == (350,)
    assert (tb[:256] == 1).all() and (tb[347:] == 0).all() and (tb[256:347] >= 2).all()
    report = make_reports(1, seed=5)[0]
    ids = tok.encode(report)
    assert tb[ids].sum() == len(report.encode("utf-8"))
    assert len(ids) < len(report) / 2  # the formulaic reports must compress


def test_decode_inverts_encode_on_random_unicode(tok):
    rng = random.Random(0)
    texts = [random_unicode(rng, rng.randint(0, 50)) for _ in range(300)]
    assert [tok.decode(ids) for ids in tok.encode_batch(texts)] == texts
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_special_tokens_only_by_id(tok):
    text = "Left Ventricle: <|bos|> <|eos|><|pad|> normal"
    ids = tok.encode(text)
    assert max(ids) < tok.bos_id
    assert tok.decode(ids) == text
    # decoding drops the specials themselves
    assert tok.decode([tok.bos_id] + tok.encode("Mildly dilated.") + [tok.eos_id, tok.pad_id]) == "Mildly dilated."


def test_save_load_round_trip(tok, tmp_path):
    tok.save(tmp_path)
    back = Tokenizer.load(tmp_path)
    assert back.mergeable_ranks == tok.mergeable_ranks and back.pattern == tok.pattern
    assert (back.bos_id, back.eos_id, back.pad_id, back.vocab_size) == (tok.bos_id, tok.eos_id, tok.pad_id, 350)
    text = make_reports(1, seed=9)[0]
    assert back.encode(text) == tok.encode(text)
    assert (back.token_bytes() == tok.token_bytes()).all()
    with pytest.raises(FileExistsError):
        tok.save(tmp_path)


def test_load_rejects_foreign_or_damaged_dirs(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json is missing"):
        Tokenizer.load(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"model": {"type": "BPE"}}))  # e.g. a HF tokenizer.json
    with pytest.raises(ValueError, match="not written by echovlm"):
        Tokenizer.load(tmp_path)
    tok.save(tmp_path, overwrite=True)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(ValueError, match="format 99"):
        Tokenizer.load(tmp_path)
    tok.save(tmp_path, overwrite=True)
    ranks = (tmp_path / RANKS_FILE).read_text().splitlines()
    (tmp_path / RANKS_FILE).write_text("\n".join(ranks[:-1]) + "\n")
    with pytest.raises(ValueError, match="checksum"):
        Tokenizer.load(tmp_path)
    (tmp_path / RANKS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.tiktoken is missing"):
        Tokenizer.load(tmp_path)


def test_train_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="at least 259"):
        Tokenizer.train(["abc"], 258)


def test_read_corpus(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\n\nsecond doc\n")
    assert read_corpus(tmp_path / "a.txt") == ["first doc", "second doc"]
    (tmp_path / "b.jsonl").write_text('{"report": "x\\ny"}\n{"text": "z"}\n')
    assert read_corpus(tmp_path / "b.jsonl") == ["x\ny", "z"]
    (tmp_path / "c.jsonl").write_text('{"other": 1}\n')
    with pytest.raises(ValueError, match="line 1"):
        read_corpus(tmp_path / "c.jsonl")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=".txt"):
        read_corpus(tmp_path / "d.csv")
    with pytest.raises(ValueError, match="is a directory; pass a corpus file: a .txt"):  # not "does not exist"
        read_corpus(tmp_path)


# ---------------------------------------------------------------------------------------------- scripts
def write_jsonl(path, reports):
    path.write_text("".join(json.dumps({"report": r}) + "\n" for r in reports))
    return str(path)


def test_tok_train_input_reruns_and_force(tmp_path, capsys):
    from scripts import tok_train

    corpus, out = write_jsonl(tmp_path / "r.jsonl", make_reports(100)), tmp_path / "tok"
    tok_train.main(["--input", corpus, "--out", str(out), "--vocab-size", "350"])
    stats = json.loads((out / "tok_stats.json").read_text())
    assert stats["vocab_size"] == Tokenizer.load(out).vocab_size == 350
    assert stats["train_reports"] == 100 and stats["tokens_per_report_min"] <= stats["tokens_per_report_mean"]
    assert stats["bytes_per_token"] == pytest.approx(stats["train_bytes"] / stats["splits"]["train"]["tokens"])

    capsys.readouterr()
    tok_train.main(["--input", corpus, "--out", str(out), "--vocab-size", "350"])
    assert "up to date" in capsys.readouterr().out
    (out / "tok_eval.json").write_text("{}")  # another step's output in the directory
    assert "--force" in tok_refused(capsys, ["--input", corpus, "--out", str(out), "--vocab-size", "300"])
    assert Tokenizer.load(out).vocab_size == 350  # refused: nothing was touched
    tok_train.main(["--input", corpus, "--out", str(out), "--vocab-size", "300", "--force"])
    assert Tokenizer.load(out).vocab_size == 300
    assert sorted(os.listdir(out)) == ["tok_eval.json", "tok_stats.json", "tokenizer.json", "tokenizer.tiktoken"]
    assert sorted(os.listdir(tmp_path)) == ["r.jsonl", "tok"]  # no partial or old directories left


def test_tok_train_dataset_writes_token_arrays(tmp_path, monkeypatch):
    from scripts import tok_train

    splits = {"train": make_reports(60, seed=1), "val": make_reports(7, seed=2), "test": make_reports(5, seed=3)}

    class FakeDataset:  # only what tok_train uses; the real format is tested in test_dataset.py
        def reports(self, split):
            return splits[split]

    monkeypatch.setattr(tok_train, "open_dataset", lambda path: FakeDataset())
    tok_train.main(["--dataset", str(tmp_path), "--vocab-size", "320"])
    out = tmp_path / "tokenizer_v320"
    tok = Tokenizer.load(out)
    for split, reports in splits.items():
        tokens, offsets = np.load(out / f"{split}_tokens.npy"), np.load(out / f"{split}_offsets.npy")
        assert tokens.dtype == np.uint16 and offsets.dtype == np.int64 and offsets.shape == (len(reports) + 1,)
        assert offsets[0] == 0 and offsets[-1] == len(tokens)
        assert [tok.decode(tokens[a:b]) for a, b in zip(offsets[:-1], offsets[1:])] == reports
    stats = json.loads((out / "tok_stats.json").read_text())
    assert stats["splits"]["val"]["reports"] == 7


def test_tok_eval_writes_table_sweep_and_plot(tmp_path, capsys, monkeypatch):
    import tiktoken

    from scripts import tok_eval, tok_train

    # stand-ins for tiktoken's downloadable encodings: one unreachable, one "cached" (plain bytes)
    def get_encoding(name):
        if name == "gpt2":
            raise ConnectionError("no network")
        return tiktoken.Encoding(name, pat_str=r"\S+|\s+", mergeable_ranks={bytes([b]): b for b in range(256)},
                                 special_tokens={})

    monkeypatch.setattr(tiktoken, "get_encoding", get_encoding)
    corpus, tok_dir = write_jsonl(tmp_path / "r.jsonl", make_reports(120)), tmp_path / "tok"
    tok_train.main(["--input", corpus, "--out", str(tok_dir), "--vocab-size", "330"])
    tok_eval.main(["--input", corpus, "--tokenizer", str(tok_dir), "--out", str(tmp_path / "ev"),
                   "--sweep", "270,300,2000"])
    result = json.loads((tmp_path / "ev" / "tok_eval.json").read_text())
    assert (tmp_path / "ev" / "tok_eval.png").stat().st_size > 0
    assert result["held_out_reports"] == 12 and result["ours"]["vocab_size"] == 330
    assert list(result["references"]) == ["o200k_base"] and result["references_skipped"] == ["gpt2"]
    assert result["references"]["o200k_base"]["bytes_per_token"] == 1.0
    bpt = [s["bytes_per_token"] for s in result["sweep"]]
    assert bpt == sorted(bpt) and bpt[0] > 1.0  # more merges never compress worse on this corpus
    assert result["sweep"][-1]["vocab_size"] < 2000  # the small corpus runs out of merges...
    assert result["plateau_vocab_size"] is not None  # ...so compression has stopped improving
    out = capsys.readouterr().out
    assert "GPT-2 (gpt2): skipped" in out and "ConnectionError" in out and "Traceback" not in out
    assert "ours (rustbpe)" in out and "GPT-4o (o200k_base)" in out


def test_bench_tokenizer_runs_on_a_small_corpus(tmp_path, capsys):
    from scripts import bench_tokenizer

    corpus = write_jsonl(tmp_path / "r.jsonl", make_reports(50))
    bench_tokenizer.main(["--input", corpus, "--vocab-size", "300", "--repeats", "1"])
    rows = {line.split("  ")[0]: line.split() for line in capsys.readouterr().out.splitlines()}
    ours, hf = rows["ours (rustbpe)"], rows["HF tokenizers"]
    assert ours[2] == hf[2] == "300"  # vocab
    assert float(ours[-1]) == 1.0 and 0.9 < float(hf[-1]) < 1.1  # same algorithm: about the same compression


# ---------------------------------------------------------------------------------------------- tok_train reliability
def tok_refused(capsys, argv, code=2) -> str:
    """tok_train's one stderr line for argv, checking it stopped with `code` (2 bad input, 1 a failure)."""
    from scripts import tok_train

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        tok_train.main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == code and len(lines) == 1 and lines[0].startswith("tok_train: "), lines
    return lines[0]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A small real prepared dataset (synthetic) with a trained tokenizer of 300 tokens."""
    from scripts import prepare_dataset, tok_train

    out = tmp_path_factory.mktemp("data") / "syn"
    assert prepare_dataset.main(["--source", "synthetic", "--n-studies", "120", "--embed-dim", "8",
                                 "--out", str(out)]) == 0
    assert tok_train.main(["--dataset", str(out), "--vocab-size", "300"]) == 0
    return out


def copy_dataset(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_tokenizer_dir_is_keyed_by_vocab_size_and_keeps_a_legacy_one(tmp_path, dataset, capsys):
    from scripts import tok_train

    first = tokenizer_dir(dataset, 300)
    assert first == dataset / "tokenizer_v300" and Tokenizer.load(first).vocab_size == 300
    before = {f: os.stat(first / f).st_mtime_ns for f in os.listdir(first)}
    # another size next to it (VOCAB_SIZE=4000 after a default run failed here): the first is not touched
    assert tok_train.main(["--dataset", str(dataset), "--vocab-size", "320"]) == 0
    assert Tokenizer.load(tokenizer_dir(dataset, 320)).vocab_size == 320
    assert {f: os.stat(first / f).st_mtime_ns for f in os.listdir(first)} == before
    # the same size again is a no-op
    capsys.readouterr()
    assert tok_train.main(["--dataset", str(dataset), "--vocab-size", "300"]) == 0
    assert "up to date" in capsys.readouterr().out
    # <dataset>/tokenizer from before the keyed layout keeps serving its size (models point at it)
    legacy = copy_dataset(dataset, tmp_path / "old")
    (legacy / "tokenizer").mkdir()
    for f in first.iterdir():
        (legacy / "tokenizer" / f.name).write_bytes(f.read_bytes())
    assert tokenizer_dir(legacy, 300) == legacy / "tokenizer"
    assert tokenizer_dir(legacy, 4000) == legacy / "tokenizer_v4000"


@pytest.mark.slow
def test_tok_train_killed_after_tokenizer_json_reruns(tmp_path, dataset, capsys):
    """A real SIGKILL to a real tok_train right after tokenizer.json is written: the rerun must succeed."""
    from scripts import tok_train

    ds = copy_dataset(dataset, tmp_path / "ds")
    saved = tmp_path / "saved"
    # tok_train as a subprocess whose Tokenizer.save announces itself and then waits to be killed
    code = (f"import sys, time, pathlib\nsys.path.insert(0, {str(ROOT)!r})\nfrom echovlm import tokenizer\n"
            f"orig = tokenizer.Tokenizer.save\n"
            f"def save(self, d, **kw):\n    orig(self, d, **kw)\n    pathlib.Path({str(saved)!r}).write_text(str(d))\n"
            f"    time.sleep(120)\n"
            f"tokenizer.Tokenizer.save = save\nfrom scripts import tok_train\n"
            f"tok_train.main(['--dataset', {str(ds)!r}, '--vocab-size', '300'])\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    try:
        deadline = time.time() + 60
        while not saved.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert saved.exists(), "tok_train never reached Tokenizer.save"
        assert (Path(saved.read_text()) / "tokenizer.json").is_file()
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    out = tokenizer_dir(ds, 300)
    assert not out.exists()  # nothing half-written where readers look
    capsys.readouterr()
    assert tok_train.main(["--dataset", str(ds), "--vocab-size", "300"]) == 0  # the same command again
    assert "left by an interrupted tok_train" in capsys.readouterr().out  # the killed run's partial directory
    assert Tokenizer.load(out).vocab_size == 300 and (out / "tok_stats.json").is_file()
    assert (out / "test_offsets.npy").is_file()


def test_check_tokens_current_catches_edited_reports(tmp_path, dataset):
    from echovlm.dataset import open_dataset

    ds = copy_dataset(dataset, tmp_path / "ds")
    (ds / "tokenizer_v300").mkdir()
    for f in (dataset / "tokenizer_v300").iterdir():
        (ds / "tokenizer_v300" / f.name).write_bytes(f.read_bytes())
    check_tokens_current(open_dataset(ds), ds / "tokenizer_v300")  # fresh: no error
    lines = (ds / "reports.jsonl").read_text(encoding="utf-8").splitlines()
    rec = json.loads(lines[-1])
    rec["report"] = rec["report"].replace("Left", "Right", 1) + " Edited."
    lines[-1] = json.dumps(rec)  # a test-split report edited after tok_train
    (ds / "reports.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(StaleTokensError, match=r"made from other reports than .*reports.jsonl holds now.*--force"):
        check_tokens_current(open_dataset(ds), ds / "tokenizer_v300")
    (ds / "tokenizer_v300" / "tok_stats.json").unlink()
    with pytest.raises(FileNotFoundError, match="tok_train never finished"):
        check_tokens_current(open_dataset(ds), ds / "tokenizer_v300")


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def reorder(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[0], lines[1] = lines[1], lines[0]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.mark.parametrize("damage, message", [
    (lambda d: truncate(d / "embeddings.npy"), r"embeddings.npy cannot be read as a .npy array"),
    (lambda d: truncate(d / "offsets.npy"), r"offsets.npy cannot be read as a .npy array"),
    (lambda d: truncate(d / "meta.json"), r"meta.json is not valid JSON"),
    (lambda d: truncate(d / "reports.jsonl", 0.6), r"reports.jsonl (line \d+ is not a|has fewer lines)"),
    (lambda d: reorder(d / "reports.jsonl"), r"reports.jsonl line 1 is study .*manifest.csv says"),
])
def test_tok_train_on_a_damaged_dataset_is_one_line(tmp_path, dataset, capsys, damage, message):
    ds = copy_dataset(dataset, tmp_path / "ds")
    damage(ds)
    assert re.search(message, tok_refused(capsys, ["--dataset", str(ds), "--vocab-size", "300"]))
    assert sorted(os.listdir(ds)) == sorted(f.name for f in dataset.iterdir() if f.is_file())  # nothing written


def test_tok_train_bad_usage_is_one_line(tmp_path, capsys):
    assert "--vocab-size 100" in tok_refused(capsys, ["--input", "x.jsonl", "--out", str(tmp_path), "--vocab-size", "100"])
    assert "--out is required" in tok_refused(capsys, ["--input", "x.jsonl"])
    assert "does not exist" in tok_refused(capsys, ["--input", str(tmp_path / "x.jsonl"), "--out", str(tmp_path / "t")])
    assert "is a directory; pass a corpus file" in tok_refused(capsys, ["--input", str(tmp_path), "--out", str(tmp_path / "t")])
    (tmp_path / "latin.txt").write_bytes(b"first report\nsecond r\xe9port\n")
    assert "latin.txt line 2 is not UTF-8 text" in tok_refused(
        capsys, ["--input", str(tmp_path / "latin.txt"), "--out", str(tmp_path / "t")])
