"""The findings head, its prompts and the GPT's findings prompt: fast, CPU, on small made-up data."""

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from echovlm.engine import Engine
from echovlm.findings import (NB, NV, FindingsHead, balanced_threshold, calibration, decide, fit_head, free_prompts,
                              label_prompts, mean_features, parse_overrides)
from echovlm.gpt import ABSENT, GPT, PRESENT, STATED, UNKNOWN, GPTConfig
from echovlm.loader import MAX_REPEAT, DeviceSplit, TrainLoader, collate, finding_weights
from echovlm.vocabulary import BINARY_TRAITS, CONTINUOUS_TRAITS, TRAITS


def test_balanced_threshold_is_the_best_cut_by_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = (rng.random(300) < 0.05).astype(float)
        y[:2] = [0, 1]
        p = np.clip(0.04 + 0.3 * y * rng.random(300) + 0.1 * rng.random(300), 0, 1).round(3)  # ties included
        t = balanced_threshold(y, p)
        best = max(balanced_accuracy_score(y, p >= c) for c in np.unique(p))
        assert balanced_accuracy_score(y, p >= t) == pytest.approx(best)


def test_calibration_of_perfectly_calibrated_and_overconfident_scores():
    rng = np.random.default_rng(0)
    p = rng.random(200_000)
    y = (rng.random(200_000) < p).astype(float)
    assert calibration(y, p)["ece"] < 0.01
    assert calibration(y, np.where(p > 0.5, 1.0, 0.0))["ece"] > 0.2
    assert sum(b["n"] for b in calibration(y, p)["bins"]) == 200_000


def test_prompts_from_labels_and_free_prompts():
    labels = np.full((2, NB + NV), 0.0, dtype=np.float32)
    labels[0, 3] = 1.0
    labels[1, 5] = np.nan
    labels[0, NB] = 55.0
    labels[1, NB:] = np.nan
    codes, values = label_prompts(labels)
    assert codes.shape == (2, NB + NV) and values.shape == (2, NV)
    assert codes[0, 3] == PRESENT and codes[0, 4] == ABSENT and codes[1, 5] == UNKNOWN
    assert codes[0, NB] == STATED and values[0, 0] == 55.0 and codes[1, NB] == UNKNOWN
    free_codes, free_values = free_prompts(3)
    assert (free_codes == UNKNOWN).all() and np.isnan(free_values).all()


def test_parse_overrides_checks_every_item():
    assert parse_overrides(["aortic_stenosis=1", "ejection_fraction=35.5"]) == {"aortic_stenosis": 1.0,
                                                                               "ejection_fraction": 35.5}
    for bad, says in [(["nope=1"], "unknown finding"), (["pacemaker=1", "pacemaker=1"], "twice"),
                      (["ejection_fraction=91"], "out of range"), (["pulmonary_artery_pressure_continuous=151"], "out of range"),
                      (["pacemaker=0.5"], "a binary finding is 0"), (["pacemaker"], "NAME=VALUE"), (["pacemaker=nan"], "a binary finding is 0")]:
        with pytest.raises(ValueError, match=says):
            parse_overrides(bad)


def learnable(n, d=16, seed=0):
    """Features where trait j is positive when feature j % d is large (rare), LVEF/PASP linear in two features."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    y = np.zeros((n, NB + NV), dtype=np.float32)
    for j in range(NB):
        y[:, j] = x[:, j % d] + 0.3 * rng.standard_normal(n) > 1.6  # ~6% positive
    y[:, NB] = 55 + 8 * x[:, 0]
    y[:, NB + 1] = np.where(rng.random(n) < 0.3, 30 + 5 * x[:, 1], np.nan)  # mostly not stated
    return x, y


def test_fit_head_learns_decides_and_round_trips():
    x, y = learnable(3000)
    vx, vy = learnable(1000, seed=1)
    head, summary = fit_head(x, y, vx, vy, hidden=32, epochs=40, seed=0, log=lambda *a: None)
    tx, ty = learnable(1000, seed=2)
    out = head.predict(tx)
    bas = [balanced_accuracy_score(ty[:, j], out["decision"][:, j]) for j in range(NB)]
    assert np.mean(bas) > 0.8, bas
    assert np.corrcoef(out["value"][:, 0], ty[:, NB])[0, 1] > 0.9
    assert summary["val_calibration"]["ece"] < 0.05 and len(summary["usable"]) == NB + NV
    # the checkpoint entry rebuilds the same head
    again = FindingsHead.from_checkpoint(head.to_checkpoint(), "test")
    np.testing.assert_allclose(again.predict(tx)["prob"], out["prob"])
    # overrides replace the decision for every study and are listed as edited
    decided = decide(head, tx[:4], {"pacemaker": 1.0, "ejection_fraction": 30.0})
    assert (decided["codes"][:, BINARY_TRAITS.index("pacemaker")] == PRESENT).all()
    assert (decided["values"][:, 0] == 30.0).all() and decided["edited"] == ["ejection_fraction", "pacemaker"]


def test_a_trait_never_settled_is_unusable_and_unknown():
    x, y = learnable(600)
    y[:, NB + 1] = np.nan  # rules that never state PASP
    y[:, 2] = 0  # and a finding that is never positive
    head, _ = fit_head(x, y, x, y, hidden=0, epochs=3, log=lambda *a: None)
    assert not head.usable[NB + 1] and not head.usable[2]
    out = decide(head, x[:3])
    assert np.isnan(out["prob"][:, 2]).all() and (out["codes"][:, 2] == UNKNOWN).all()
    assert (out["codes"][:, NB + 1] == UNKNOWN).all()
    with pytest.raises(ValueError, match="does not define it"):
        parse_overrides(["pulmonary_artery_pressure_continuous=40"], head)


def test_damaged_head_entry_is_one_clear_error():
    head = FindingsHead(8, 4)
    entry = head.to_checkpoint()
    with pytest.raises(ValueError, match="other traits"):
        FindingsHead.from_checkpoint({**entry, "traits": ["x"]}, "f.pt")
    with pytest.raises(ValueError, match="does not load"):
        FindingsHead.from_checkpoint({**entry, "state": {}}, "f.pt")


def tiny_gpt(n_prompt=True):
    torch.manual_seed(0)
    return GPT(GPTConfig(depth=1, vocab_size=32, embed_dim=8, sequence_len=48,
                         n_findings=NB if n_prompt else 0, n_values=NV if n_prompt else 0))


def test_the_prompt_sits_between_the_study_and_bos_and_is_read():
    model = tiny_gpt()
    with torch.no_grad():  # a fresh model's residual branches are zero: attention would carry nothing yet
        for block in model.blocks:
            block.attn.c_proj.weight.normal_(0, 0.1)
    emb = [np.ones((2, 8), np.float32), np.ones((1, 8), np.float32)]
    codes, values = free_prompts(2)
    b = collate(emb, [[5, 6, 7], [8]], 0, 1, 2, 48, "cpu", prompts=(codes, values))
    # row 0: 2 study rows, 25 prompt positions, <|bos|> at 27, then 3 tokens
    assert b.prefix_mask[0, :2].all() and not b.prefix_mask[0, 2:].any()
    assert b.prompt_mask[0, 2:27].all() and b.prompt_mask.sum() == 2 * (NB + NV)
    assert b.ids[0, 27] == 0 and b.ids[1, 26] == 0 and (b.targets[0, :27] == -1).all() and b.targets[0, 27] == 5
    free = model(b.ids, b.prefix, b.prefix_mask, **b.prompt)
    codes[:, 0], values[:, 0] = PRESENT, 35.0
    codes[:, NB] = STATED
    b2 = collate(emb, [[5, 6, 7], [8]], 0, 1, 2, 48, "cpu", prompts=(codes, values))
    prompted = model(b2.ids, b2.prefix, b2.prefix_mask, **b2.prompt)
    assert not torch.allclose(free[:, -1], prompted[:, -1])  # the prompt reaches the report positions
    # a value's embedding depends on the value
    v = model.embed_prompt(torch.from_numpy(codes[:1]), torch.tensor([[35.0, np.nan]]))
    w = model.embed_prompt(torch.from_numpy(codes[:1]), torch.tensor([[60.0, np.nan]]))
    assert not torch.allclose(v[0, NB], w[0, NB]) and torch.allclose(v[0, :NB], w[0, :NB])


def test_prompt_dropout_is_seeded_per_global_batch_and_the_same_for_every_split():
    n = 64
    labels = np.zeros((n, NB + NV), np.float32)
    labels[:, 0] = 1.0
    split = DeviceSplit(np.arange(3, 3 + n * 2) % 30, np.arange(n + 1) * 2, np.ones((n, 8), np.float16),
                        np.arange(n + 1), 0, 1, 2, None, "cpu", labels=labels)
    assert split.n_prompt == NB + NV and split.sequence_len >= 1 + NB + NV + 1 + 2

    def dropped(world, rank, accum_batch):
        loader = TrainLoader(split, 16, accum_batch, rank=rank, world_size=world, seed=3, prompt_dropout=0.5)
        out = []
        for _ in range(4):
            out += [(b.prompt_codes[:, 0] == UNKNOWN).tolist() for b in loader.next()]
        return out

    one = sum(dropped(1, 0, 4), [])
    assert 0.2 < np.mean(one) < 0.8  # about half the prompts dropped
    assert one == sum(dropped(1, 0, 16), [])  # the split into micro batches does not change which
    two = dropped(2, 0, 4), dropped(2, 1, 4)
    merged = sum([two[0][i * 2:i * 2 + 2] + two[1][i * 2:i * 2 + 2] for i in range(4)], [])
    assert sum(merged, []) == one  # nor the number of ranks


def test_swapped_studies_read_another_studys_embeddings_with_their_own_prompt_and_report():
    n, k = 64, np.array([1, 2] * 32)  # two clip counts: a swapped row's prefix takes its source's length
    labels = np.zeros((n, NB + NV), np.float32)
    labels[:, 0] = np.arange(n) % 2
    emb = np.repeat(np.arange(n, dtype=np.float16), k)[:, None] * np.ones((1, 8), np.float16)  # row value = study
    tokens = (np.arange(n * 3) % 30 + 3).astype(np.int64)
    split = DeviceSplit(tokens, np.arange(n + 1) * 3, emb, np.concatenate([[0], np.cumsum(k)]), 0, 1, 2, None, "cpu",
                        labels=labels)

    def batches(**kw):
        loader = TrainLoader(split, 16, 8, seed=3, **kw)
        return [loader.next() for _ in range(3)]

    for a, b in zip(batches(prompt_dropout=0.5), batches(prompt_dropout=0.5, swap_embeddings=0.0)):
        for x, y in zip(a, b):  # off: the very batches of a loader without it, drops included
            assert torch.equal(x.ids, y.ids) and torch.equal(x.prefix, y.prefix)
            assert torch.equal(x.prompt_codes, y.prompt_codes)
    loader = TrainLoader(split, 16, 16, seed=3, prompt_dropout=0.0, swap_embeddings=1.0)
    loader._order = loader._epoch_order(0)
    studies = loader._order[0]
    (b,) = loader.next()
    rows = b.prefix[:, 0].long().tolist()  # the study each prefix row came from, in row order
    owners = [rows[int(before)] for before in np.concatenate([[0], np.cumsum(b.prefix_mask.sum(1).numpy())[:-1]])]
    assert all(o != s for o, s in zip(owners, studies))  # nobody reads its own embeddings
    assert b.prefix_mask.sum(1).tolist() == [int(k[o]) for o in owners]  # and each reads all of its source's
    assert b.prompt_codes[:, 0].tolist() == [int(labels[s, 0]) for s in studies]  # its own prompt
    assert b.ids[b.ids >= 3].numel() == 16 * 3  # and its own report tokens
    assert loader.global_stats["targets"] == 16 * 4
    free = TrainLoader(split, 16, 16, seed=3, prompt_dropout=1.0, swap_embeddings=1.0)
    (d,) = free.next()
    assert (d.prompt_codes == UNKNOWN).all()  # only prompted reports are swapped: a free report reads its own study
    assert sorted(set(d.prefix[:, 0].long().tolist())) == sorted(free._epoch_order(0)[0].tolist())


def test_balanced_sampling_draws_rare_findings_more_often_and_off_is_the_uniform_order():
    n = 1000
    labels = np.zeros((n, NB + NV), np.float32)
    labels[:20, 0] = 1.0  # a 2% finding
    labels[::2, 1] = 1.0  # a 50% one, above the floor: no boost
    labels[500:, 2] = np.nan  # unsettled is not present
    labels[20:25, 3] = 1.0  # a 0.5% one: 0.2 / 0.005 = 40, capped
    w = finding_weights(labels, 0.2)
    assert np.isclose(w.sum(), 1.0)
    assert np.isclose(w[0] / w[999], 10.0) and np.isclose(w[1] / w[999], 10.0)  # 0.2 / 0.02
    assert np.isclose(w[20] / w[999], MAX_REPEAT) and np.isclose(w[24] / w[999], MAX_REPEAT)
    assert np.isclose(w[30] / w[999], 1.0) and np.isclose(w[501] / w[999], 1.0)
    def make_split(labels):
        return DeviceSplit(np.arange(n * 2) % 30 + 3, np.arange(n + 1) * 2, np.ones((n, 8), np.float16),
                           np.arange(n + 1), 0, 1, 2, None, "cpu", labels=labels)

    split = make_split(labels)
    drawn = np.concatenate([TrainLoader(split, 100, 100, seed=s, balance_findings=0.2)._epoch_order(0).ravel()
                            for s in range(5)])
    assert 0.13 < np.mean(drawn < 20) < 0.21  # 200 / 1225 = 0.16 expected, 0.02 uniform
    plain, off = TrainLoader(split, 100, 100, seed=3), TrainLoader(split, 100, 100, seed=3, balance_findings=0.0)
    assert np.array_equal(plain._epoch_order(0), off._epoch_order(0))
    with pytest.raises(ValueError, match="needs the split's labels"):
        TrainLoader(make_split(None), 100, 100, balance_findings=0.2)


def test_engine_prompts_are_checked_and_a_model_without_a_prompt_refuses_them():
    class Tok:
        pad_id, bos_id, eos_id = 2, 0, 1

        def decode(self, ids):
            return " ".join(map(str, ids))

    engine = Engine(tiny_gpt().eval(), Tok())
    emb = [np.ones((1, 8), np.float32)] * 2
    codes, values = free_prompts(2)
    assert len(engine.generate(emb, max_tokens=3, prompts=(codes, values))) == 2
    assert len(engine.generate(emb, max_tokens=3)) == 2  # None: every finding unknown
    with pytest.raises(ValueError, match="prompts must be"):
        engine.generate(emb, max_tokens=3, prompts=(codes[:1], values[:1]))
    with pytest.raises(ValueError, match="no findings prompt"):
        Engine(tiny_gpt(False).eval(), Tok()).generate(emb, max_tokens=3, prompts=(codes, values))


def test_mean_features_are_unit_means_of_any_clip_count():
    embs = [np.array([[3.0, 0.0], [1.0, 0.0]]), np.array([[0.0, 2.0]])]
    np.testing.assert_allclose(mean_features(embs), [[1.0, 0.0], [0.0, 1.0]])
    assert list(TRAITS)[:NB] == BINARY_TRAITS and list(TRAITS)[NB:] == CONTINUOUS_TRAITS


def test_thresholds_follow_the_rule_that_wins_on_held_out_val():
    from echovlm.findings import choose_thresholds

    rng = np.random.default_rng(0)
    y = (rng.random((4000, 3)) < 0.05).astype(float)
    calibrated = np.clip(0.05 + 0.5 * y * rng.random((4000, 3)), 0, 1)
    t, rule, heldout = choose_thresholds(y, calibrated, np.full(3, 0.05), np.ones(3, bool))
    assert set(heldout) == {"prevalence", "val-optimised"} and rule == max(heldout, key=heldout.get)
    # a head whose probabilities are all shifted up: the prevalence cut calls everything positive, the val cut not
    shifted = calibrated + 0.5
    t, rule, _ = choose_thresholds(y, shifted, np.full(3, 0.05), np.ones(3, bool))
    assert rule == "val-optimised" and all(x > 0.5 for x in t)
