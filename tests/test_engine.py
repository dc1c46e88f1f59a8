"""The engine against the slow obvious way: a full forward pass per token, one study at a time, no cache.

An untrained GPT with random weights (fp32, CPU) stands in for a trained one: what is checked is that the
cache, batching, grouping by k, early stopping and sample sharing change nothing about the tokens. The engine
runs in fp32 here (not "auto", bf16 on some CPUs) so that it computes exactly what the naive loop does.
"""

import pytest
import torch

from echovlm.common import resolve_dtype
from echovlm.engine import Engine, KVCache, sample_next
from echovlm.gpt import GPT, GPTConfig
from echovlm.tokenizer import Tokenizer

EMBED_DIM = 16
SEQ_LEN = 40
TEXTS = [f"Left Ventricle: The left ventricle is {w} in size. Ejection fraction is {ef}%."
         for w in ("normal", "mildly dilated", "severely dilated") for ef in (35, 55, 60)]


class EosBias(torch.nn.Module):
    """The model with a constant added to the <|eos|> logit, so that an untrained model ends some reports
    early and lets others run to the token limit. Records every call's (rows, positions, prefix slots)."""

    def __init__(self, model, eos_id: int, bias: float):
        super().__init__()
        self.model, self.eos_id, self.bias = model, eos_id, bias
        self.config = model.config
        self.calls = []

    def forward(self, ids, prefix, prefix_mask, kv_cache=None):
        self.calls.append((ids.shape[0], ids.shape[1], int(prefix_mask.sum())))
        logits = self.model(ids, prefix, prefix_mask, kv_cache=kv_cache)
        logits[..., self.eos_id] += self.bias
        return logits


def naive_greedy(model, tok, emb: torch.Tensor, max_tokens: int) -> list[int]:
    k = emb.shape[0]
    ids = [tok.pad_id] * k + [tok.bos_id]
    out = []
    for _ in range(max_tokens):
        x = torch.tensor([ids])
        mask = torch.zeros_like(x, dtype=torch.bool)
        mask[0, :k] = True
        nxt = int(model(x, emb, mask)[0, -1].argmax())
        if nxt == tok.eos_id:
            break
        out.append(nxt)
        ids.append(nxt)
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # these matrices are tiny: extra intra-op threads only add synchronisation, badly so on a busy machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def setup():
    tok = Tokenizer.train(TEXTS, vocab_size=300)
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(depth=2, vocab_size=tok.vocab_size, embed_dim=EMBED_DIM, sequence_len=SEQ_LEN))
    with torch.no_grad():  # random weights everywhere (a fresh GPT may zero-init its output layers)
        for p in gpt.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, p.shape[-1] ** -0.5)
    gpt.eval()
    g = torch.Generator().manual_seed(1)
    studies = [torch.randn(k, EMBED_DIM, generator=g) for k in (1, 2, 1, 3, 1, 2, 1, 1, 3, 1)]
    # the smallest <|eos|> bias at which some greedy reports end early and some hit the limit
    for bias in torch.linspace(0.0, 12.0, 49).tolist():
        model = EosBias(gpt, tok.eos_id, bias)
        lengths = [len(r[0]) for r in Engine(model, tok, "fp32").generate(studies)]  # checked against naive below
        if any(n < SEQ_LEN - e.shape[0] - 1 for n, e in zip(lengths, studies)) and len(set(lengths)) >= 3 \
                and max(n + e.shape[0] + 1 for n, e in zip(lengths, studies)) == SEQ_LEN:
            return model, tok, studies, lengths
    pytest.fail("no <|eos|> bias gave a mix of early-stopped and full-length reports")


def test_batched_equals_single_equals_naive(setup):
    model, tok, studies, lengths = setup
    engine = Engine(model, tok, "fp32")
    batched = engine.generate(studies, batch_size=64)
    single = [engine.generate([e], batch_size=1)[0] for e in studies]
    naive = [[naive_greedy(model, tok, e, SEQ_LEN - e.shape[0] - 1)] for e in studies]
    assert batched == single == naive
    assert [len(r[0]) for r in batched] == lengths
    assert tok.eos_id not in {t for r in batched for t in r[0]}


def test_rows_finish_independently_at_max_tokens(setup):
    model, tok, studies, lengths = setup
    engine = Engine(model, tok, "fp32")
    # about half the rows are cut by the limit, the others end on <|eos|> before it (k <= 3 fits in SEQ_LEN)
    limit = min(sorted(lengths)[len(lengths) // 2], SEQ_LEN - 4)
    assert min(lengths) < limit < max(lengths)
    out = engine.generate(studies, max_tokens=limit, batch_size=4)
    for r, e, n in zip(out, studies, lengths):
        assert r[0] == naive_greedy(model, tok, e, limit)
        assert len(r[0]) == min(limit, n)


def test_batches_group_studies_by_number_of_embeddings(setup):
    model, tok, studies, _ = setup
    model.calls.clear()
    Engine(model, tok, "fp32").generate(studies, max_tokens=3, batch_size=64)
    prefills = [c for c in model.calls if c[2] > 0]
    # one prefill per k (1, 2, 3), each of its studies' rows with k embeddings + <|bos|>
    assert sorted((rows, pos, slots) for rows, pos, slots in prefills) == [(2, 3, 4), (2, 4, 6), (6, 2, 6)]


def test_sampling_is_seeded_and_samples_share_one_prefill(setup):
    model, tok, studies, _ = setup
    engine = Engine(model, tok, "fp32")
    kw = dict(temperature=1.0, top_k=20, num_samples=3, batch_size=64, max_tokens=12)
    model.calls.clear()
    a = engine.generate(studies, seed=7, **kw)
    prefill_rows = sum(c[0] for c in model.calls if c[2] > 0)
    first_decode_rows = [c[0] for c in model.calls if c[2] == 0][0]
    assert prefill_rows == len(studies)  # each study's prefix is computed once, not once per sample
    assert first_decode_rows == 3 * 6  # ... then decoded 3 times (the k=1 group has 6 studies)
    assert a == engine.generate(studies, seed=7, **kw)
    assert a != engine.generate(studies, seed=8, **kw)
    assert all(len(s) == 3 for s in a)
    assert any(len({tuple(x) for x in s}) > 1 for s in a)  # samples of a study differ
    # top_k=1 leaves one candidate: sampling at any temperature is greedy
    greedy = engine.generate(studies, max_tokens=12)
    assert engine.generate(studies, temperature=2.0, top_k=1, num_samples=2, max_tokens=12) == \
        [[g[0], g[0]] for g in greedy]


def test_generate_text_decodes(setup):
    model, tok, studies, _ = setup
    engine = Engine(model, tok, "fp32")
    ids = engine.generate(studies[:2], max_tokens=8)
    assert engine.generate_text(studies[:2], max_tokens=8) == [[tok.decode(ids[0][0])], [tok.decode(ids[1][0])]]


def test_sample_next_top_k_stays_in_top_k():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    draws = sample_next(logits, 1.0, 5, torch.Generator().manual_seed(1))
    top5 = logits.topk(5, dim=1).indices
    assert (top5 == draws[:, None]).any(1).all()
    assert torch.equal(sample_next(logits, 0.0, None, None), logits.argmax(1))


def test_kv_cache_expand_and_keep():
    cache = KVCache(num_layers=2, max_len=5)
    k = torch.arange(2 * 1 * 3 * 4, dtype=torch.float32).view(2, 1, 3, 4)
    got_k, _ = cache.insert_kv(0, k, -k)
    cache.insert_kv(1, k, -k)
    cache.advance(3)
    assert torch.equal(got_k, k) and cache.pos == 3
    cache.expand(3)
    assert cache.kv.shape == (2, 2, 6, 1, 5, 4)  # (layers, k/v, rows, heads, max_len, head_dim): 2 rows x 3
    assert torch.equal(cache.kv[0, 0, 4, :, :3], k[1])
    cache.keep(torch.tensor([5, 0]))
    assert torch.equal(cache.kv[1, 1, 0, :, :3], -k[1]) and torch.equal(cache.kv[1, 1, 1, :, :3], -k[0])
    with pytest.raises(RuntimeError, match="full"):
        cache.insert_kv(0, torch.zeros(2, 1, 3, 4), torch.zeros(2, 1, 3, 4))


def test_precision_is_the_engines_choice(setup):
    model, tok, studies, _ = setup
    seen = []

    class Spy(torch.nn.Module):  # records the cache's dtype after each forward: what autocast made k and v
        def __init__(self):
            super().__init__()
            self.model, self.config = model, model.config

        def forward(self, ids, prefix, prefix_mask, kv_cache=None):
            out = self.model(ids, prefix, prefix_mask, kv_cache=kv_cache)
            seen.append(kv_cache.kv.dtype)
            return out

    for dtype, expected in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        seen.clear()
        out = Engine(Spy(), tok, dtype).generate(studies, max_tokens=4)
        assert set(seen) == {expected} and all(len(r[0]) <= 4 for r in out)
    assert Engine(model, tok).dtype == resolve_dtype("auto", "cpu")  # "auto": training's choice on this machine


def test_bad_input_is_refused(setup):
    model, tok, studies, _ = setup
    engine = Engine(model, tok, "fp32")
    with pytest.raises(ValueError, match=f"\\(k, {EMBED_DIM}\\)"):
        engine.generate([torch.zeros(1, EMBED_DIM + 1)])
    with pytest.raises(ValueError, match="NaN"):
        engine.generate([torch.full((1, EMBED_DIM), float("nan"))])
    with pytest.raises(ValueError, match="max_tokens"):
        engine.generate(studies, max_tokens=SEQ_LEN)
