"""The model on its own: shapes, padding invariance, the KV-cache contract, optimiser groups, and that it learns
(overfits a tiny batch; uses the study prefix when the report depends on it). Tiny configs, CPU, fp32."""

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

from echovlm.engine import KVCache
from echovlm.gpt import GPT, GPTConfig
from echovlm.loader import collate
from echovlm.optim import Muon
from echovlm.vocabulary import DEFAULT_VOCAB_SIZE

BOS, EOS, PAD = 20, 21, 22
VOCAB = 23
D = 8


def tiny(depth=1, seq=32, seed=0, randomise=False, kv_heads=1) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(depth=depth, vocab_size=VOCAB, embed_dim=D, sequence_len=seq, kv_heads=kv_heads))
    if randomise:  # the zero-initialised output projections would hide bugs in what feeds them
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, p.shape[-1] ** -0.5)
    return model


def batch_of(ks, lens, seed=0, pad_multiple=1, seq=32):
    g = np.random.default_rng(seed)
    embs = [g.standard_normal((k, D)).astype(np.float32) for k in ks]
    toks = [g.integers(0, 20, n).tolist() for n in lens]
    return collate(embs, toks, BOS, EOS, PAD, seq, "cpu", pad_multiple)


@pytest.mark.parametrize("ks", [[1, 1, 1], [1, 3, 2]])
def test_forward_backward_shapes(ks):
    model = tiny(depth=2)
    b = batch_of(ks, [5, 9, 3])
    assert b.prefix.shape == (sum(ks), D) and int(b.prefix_mask.sum()) == sum(ks)
    logits = model(b.ids, b.prefix, b.prefix_mask)
    assert logits.shape == (3, b.ids.shape[1], VOCAB) and logits.dtype == torch.float32
    assert logits.abs().max() <= 15.0  # soft-capped
    loss = model(b.ids, b.prefix, b.prefix_mask, b.targets)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    # fresh model: lm_head ~ 0, so the loss starts at ln(V), a uniform guess
    assert abs(loss.item() - np.log(VOCAB)) < 0.05
    # once the (zero-initialised) attention output is not zero, the prefix reaches the loss
    trained = tiny(depth=2, randomise=True)
    trained(b.ids, b.prefix, b.prefix_mask, b.targets).backward()
    assert trained.projector.weight.grad.abs().sum() > 0


def test_padding_does_not_change_the_loss():
    model = tiny(depth=2, randomise=True)
    tight = batch_of([1, 3, 2], [5, 9, 3], pad_multiple=1)
    loose = batch_of([1, 3, 2], [5, 9, 3], pad_multiple=32)
    assert loose.ids.shape[1] == 32 > tight.ids.shape[1]
    a = model(tight.ids, tight.prefix, tight.prefix_mask, tight.targets)
    b = model(loose.ids, loose.prefix, loose.prefix_mask, loose.targets)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # a row's summed loss does not depend on which other rows share the batch
    rows = model(tight.ids, tight.prefix, tight.prefix_mask, tight.targets, loss_reduction="none").view(3, -1)
    g = np.random.default_rng(0)
    embs = [g.standard_normal((k, D)).astype(np.float32) for k in (1, 3, 2)]
    toks = [g.integers(0, 20, n).tolist() for n in (5, 9, 3)]
    single = collate(embs[1:2], toks[1:2], BOS, EOS, PAD, 32, "cpu")
    torch.testing.assert_close(model(single.ids, single.prefix, single.prefix_mask, single.targets, loss_reduction="sum"),
                               rows[1].sum(), rtol=1e-5, atol=1e-5)


def test_targets_layout_predicts_report_and_eos_only():
    b = collate([np.zeros((2, D))], [[7, 8, 9]], BOS, EOS, PAD, 32, "cpu")
    assert b.ids.tolist() == [[PAD, PAD, BOS, 7, 8, 9]]
    assert b.targets.tolist() == [[-1, -1, 7, 8, 9, EOS]]
    assert b.num_targets == 4 and b.num_padding == 0
    # too long: keep what fits, and predict the next report token instead of <|eos|>
    cut = collate([np.zeros((1, D))], [list(range(10))], BOS, EOS, PAD, 6, "cpu")
    assert cut.ids.tolist() == [[PAD, BOS, 0, 1, 2, 3]] and cut.targets.tolist() == [[-1, 0, 1, 2, 3, 4]]
    assert cut.num_truncated == 1


# depth 2: one head; depth 8: 4 query heads sharing 1 or 2 key/value heads, or one each (kv_heads 0). Decoding
# stacks a key/value head's queries (no mask); the full forward is SDPA's own grouped attention: they must agree
@pytest.mark.parametrize("depth,kv_heads", [(2, 1), (8, 1), (8, 2), (8, 0)])
def test_kv_cache_prefill_and_decode_match_the_full_forward(depth, kv_heads):
    model = tiny(depth=depth, randomise=True, kv_heads=kv_heads).eval()
    assert model.blocks[0].attn.c_k.out_features == (kv_heads or model.config.n_head) * model.config.head_dim
    b = batch_of([2, 2], [7, 7])
    full = model(b.ids, b.prefix, b.prefix_mask)
    cache = KVCache(model.config.n_layer, model.config.sequence_len)
    parts = [model(b.ids[:, :4], b.prefix, b.prefix_mask[:, :4], kv_cache=cache)]
    assert cache.pos == 4
    for t in range(4, b.ids.shape[1]):
        parts.append(model(b.ids[:, t:t + 1], b.prefix[:0], b.prefix_mask[:, t:t + 1], kv_cache=cache))
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-4)
    assert cache.pos == b.ids.shape[1]
    with pytest.raises(ValueError, match="new positions"):
        model(b.ids[:, :2], b.prefix[:0], b.prefix_mask[:, :2] & False, kv_cache=cache)


def test_bf16_autocast_keeps_attention_and_kv_cache_in_bf16():
    # the rotary tables are fp32: without a cast back, q/k (and so the cache) would silently run in fp32 on CUDA
    model = tiny(depth=2, randomise=True).eval()
    b = batch_of([2, 2], [7, 7])
    cache = KVCache(model.config.n_layer, model.config.sequence_len)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        logits = model(b.ids, b.prefix, b.prefix_mask, kv_cache=cache)
    assert cache.kv.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_key_value_heads_must_divide_the_query_heads():
    with pytest.raises(ValueError, match="kv_heads must divide the 4 query heads"):
        GPT(GPTConfig(depth=8, vocab_size=VOCAB, embed_dim=D, kv_heads=3))


def test_bad_inputs_are_refused():
    model = tiny()
    b = batch_of([1], [4])
    with pytest.raises(ValueError, match=r"prefix must be \(P, 8\)"):
        model(b.ids, torch.zeros(1, D + 1), b.prefix_mask)
    with pytest.raises(ValueError, match="sequence_len"):
        model(torch.zeros(1, 40, dtype=torch.long), b.prefix, torch.zeros(1, 40, dtype=torch.bool))


def test_config_size_and_optimiser_groups():
    config = GPTConfig(depth=8, embed_dim=512, sequence_len=256)  # the default vocabulary
    assert json.loads(json.dumps(asdict(config))) == asdict(config)
    assert (config.n_embd, config.n_head, config.head_dim) == (512, 4, 128)
    with torch.device("meta"):
        model = GPT(config)
    assert config.vocab_size == DEFAULT_VOCAB_SIZE and round(model.num_params() / 1e6, 1) == 24.3  # gpt.py's docstring
    adamw, muon = model.setup_optimizers()
    adam_params = [p for g in adamw.param_groups for p in g["params"]]
    muon_params = [p for g in muon.param_groups for p in g["params"]]
    assert isinstance(muon, Muon) and muon.ns_dtype == torch.float32 and all(p.ndim == 2 for p in muon_params)
    ids = {id(p) for p in adam_params} | {id(p) for p in muon_params}
    assert len(ids) == len(adam_params) + len(muon_params) == len(list(model.parameters()))
    assert {id(p) for p in adam_params} == {id(model.wte.weight), id(model.projector.weight), id(model.lm_head.weight)}
    assert all(g["initial_lr"] == g["lr"] > 0 for opt in (adamw, muon) for g in opt.param_groups)
    assert model.estimate_flops() > 6 * (model.num_params() - model.wte.weight.numel())


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_matches_torch_optim_muon(nesterov):
    """Our Muon only adds a choice of Newton-Schulz dtype: in bf16 it must be torch.optim.Muon exactly."""
    g = torch.Generator().manual_seed(0)
    shapes = [(16, 48), (48, 16), (24, 24)]
    ours = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov)
    opt_ours, opt_ref = Muon(ours, ns_dtype=torch.bfloat16, **kw), torch.optim.Muon(ref, **kw)
    for _ in range(3):
        for a, b in zip(ours, ref):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        opt_ours.step()
        opt_ref.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # fp32 orthogonalisation: the same update up to bf16 rounding
    fp32 = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    bf16 = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    for p, q in zip(fp32, bf16):
        p.grad = torch.randn(p.shape, generator=g)
        q.grad = p.grad.clone()
    Muon(fp32, ns_dtype=torch.float32, **kw).step()
    Muon(bf16, ns_dtype=torch.bfloat16, **kw).step()
    for p, q, r in zip(fp32, bf16, ref):
        torch.testing.assert_close(p - r, q - r, rtol=0.05, atol=2e-3)
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(3))])


def train_steps(model, make_batch, steps):
    opts = model.setup_optimizers(matrix_lr=0.02, embedding_lr=0.3, projector_lr=0.05, unembedding_lr=0.02)
    for step in range(steps):
        b = make_batch(step)
        loss = model(b.ids, b.prefix, b.prefix_mask, b.targets)
        loss.backward()
        for opt in opts:
            opt.step()
        model.zero_grad(set_to_none=True)
    return loss.item()


def test_tiny_model_overfits_a_tiny_batch():
    model = tiny(depth=1)
    b = batch_of([1, 2, 1, 1], [6, 4, 8, 5], seed=3)
    start = model(b.ids, b.prefix, b.prefix_mask, b.targets).item()
    final = train_steps(model, lambda step: b, 150)
    assert final < 0.05 < start


def test_the_study_prefix_matters():
    """Reports whose words depend on the embedding: the trained model needs the true prefix to predict them."""
    g = np.random.default_rng(0)
    centres = g.standard_normal((4, D)).astype(np.float32) * 2

    def studies(n, rng):
        cls = rng.integers(0, 4, n)
        embs = [(centres[c] + 0.3 * rng.standard_normal(D)).astype(np.float32)[None] for c in cls]
        # a shared template with class-specific words in slots 1 and 3 and one random filler word
        toks = [[10, 4 * c, 11, 4 * c + 1 + int(rng.integers(0, 3)), 12, 13 + int(rng.integers(0, 5))] for c in cls]
        return embs, toks

    model = tiny(depth=1, seed=1)
    rng = np.random.default_rng(1)

    def make_batch(step):
        e, t = studies(32, rng)
        return collate(e, t, BOS, EOS, PAD, 32, "cpu")

    train_steps(model, make_batch, 200)
    val_e, val_t = studies(256, np.random.default_rng(99))
    true = collate(val_e, val_t, BOS, EOS, PAD, 32, "cpu")
    shuffled = collate([val_e[i] for i in np.random.default_rng(5).permutation(256)], val_t, BOS, EOS, PAD, 32, "cpu")
    model.eval()
    with torch.no_grad():
        l_true = model(true.ids, true.prefix, true.prefix_mask, true.targets).item()
        l_shuf = model(shuffled.ids, shuffled.prefix, shuffled.prefix_mask, shuffled.targets).item()
    # knowing the class is worth ln(4) nats on each of 2 of the 7 targets (~0.4 nats per token)
    assert l_true < l_shuf - 0.2, (l_true, l_shuf)
