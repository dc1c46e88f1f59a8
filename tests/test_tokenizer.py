"""echovlm.tokenizer (rustbpe training + tiktoken encoding, save/load) and the tok_train / tok_eval scripts."""

import json
import random

import numpy as np
import pytest

from echovlm.tokenizer import CONFIG_FILE, RANKS_FILE, Tokenizer, read_corpus

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
    with pytest.raises(SystemExit, match="--force"):
        tok_train.main(["--input", corpus, "--out", str(out), "--vocab-size", "300"])
    assert Tokenizer.load(out).vocab_size == 350  # refused: nothing was touched
    tok_train.main(["--input", corpus, "--out", str(out), "--vocab-size", "300", "--force"])
    assert Tokenizer.load(out).vocab_size == 300


def test_tok_train_dataset_writes_token_arrays(tmp_path, monkeypatch):
    from scripts import tok_train

    splits = {"train": make_reports(60, seed=1), "val": make_reports(7, seed=2), "test": make_reports(5, seed=3)}

    class FakeDataset:  # only what tok_train uses; the real format is tested in test_dataset.py
        def reports(self, split):
            return splits[split]

    monkeypatch.setattr("echovlm.dataset.open_dataset", lambda path: FakeDataset())
    tok_train.main(["--dataset", str(tmp_path), "--vocab-size", "320"])
    out = tmp_path / "tokenizer"
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
