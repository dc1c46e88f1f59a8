"""echovlm.checkpoint's loading: a missing, hostile, truncated or edited file is one clear line (a ValueError or
FileNotFoundError the CLIs print), and torch's advice to re-run with weights_only=False never reaches the user."""

from dataclasses import asdict

import pytest
import torch

from echovlm.checkpoint import FORMAT_VERSION, build_model, read_checkpoint
from echovlm.gpt import GPT, GPTConfig


class Payload:  # any class: weights_only refuses it before anything of it runs
    pass


def tiny_checkpoint() -> dict:
    model = GPT(GPTConfig(depth=1, vocab_size=32, embed_dim=8, sequence_len=16))
    return {"format_version": FORMAT_VERSION, "model": model.state_dict(), "config": asdict(model.config),
            "meta": {"dataset": "d", "tokenizer_dir": "t"}}


def one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message and "weights_only" not in message and "Re-running" not in message, message
    return message


def test_a_good_checkpoint_round_trips(tmp_path):
    torch.save(tiny_checkpoint(), tmp_path / "ok.pt")
    ckpt = read_checkpoint(tmp_path / "ok.pt")
    assert build_model(ckpt, tmp_path / "ok.pt", "cpu").config.depth == 1


def test_a_checkpoint_from_before_shared_key_value_heads_loads_with_one_per_query_head(tmp_path):
    model = GPT(GPTConfig(depth=4, vocab_size=32, embed_dim=8, sequence_len=16, kv_heads=0))
    config = asdict(model.config)
    del config["kv_heads"]  # what a checkpoint saved before the field holds
    ckpt = {"format_version": FORMAT_VERSION, "model": model.state_dict(), "config": config, "meta": {}}
    torch.save(ckpt, tmp_path / "old.pt")
    loaded = build_model(read_checkpoint(tmp_path / "old.pt"), tmp_path / "old.pt", "cpu")
    assert loaded.config.n_kv_head == loaded.config.n_head == 2 and loaded.config.kv_heads == 0


def test_hostile_pickle_is_refused_unread_without_torchs_hint(tmp_path):
    torch.save({"format_version": FORMAT_VERSION, "model": Payload()}, tmp_path / "hostile.pt")
    with pytest.raises(ValueError) as e:
        read_checkpoint(tmp_path / "hostile.pt")
    assert "refused unread" in one_line(e) and "hostile.pt" in str(e.value)


@pytest.mark.parametrize("keep", [0, 100, 5000])
def test_truncated_or_empty_file_is_one_line(tmp_path, keep):
    torch.save(tiny_checkpoint(), tmp_path / "ok.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:keep])
    with pytest.raises(ValueError) as e:
        read_checkpoint(tmp_path / "cut.pt")
    assert "not a readable echovlm checkpoint" in one_line(e)


def test_missing_file_and_damaged_entries(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        read_checkpoint(tmp_path / "nowhere.pt")
    bad = tiny_checkpoint() | {"meta": [1, 2]}
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ValueError) as e:
        read_checkpoint(tmp_path / "bad.pt")
    assert "meta entry is not a mapping" in one_line(e)


def test_weights_that_do_not_fit_the_config_are_one_line(tmp_path):
    ckpt = tiny_checkpoint()
    ckpt["model"] = {k: v[..., :1] for k, v in ckpt["model"].items()}
    with pytest.raises(ValueError) as e:
        build_model(ckpt, tmp_path / "edited.pt", "cpu")
    assert "do not match" in one_line(e)
