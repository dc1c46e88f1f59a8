"""Batched, KV-cached report generation from study embeddings.

One batch of studies is prefilled in a single forward pass, each row laid out as in training:
[e_1 .. e_k, f_1 .. f_F, <|bos|>] (prefix_mask True on the e's, prompt_mask on the F findings prompt
positions of a model that has them, pad_id in ids there). Without prompts such a model is given "unknown" for
every finding: a free report, written from the embeddings alone. The last logits give each row's
first report token; after that every step feeds one token per row and reads the cached keys/values of
everything before it, so a report costs one prefill plus one cheap step per token.

Studies are grouped by k, their number of embeddings, and each batch holds studies of one k only. The
model's cache has one position counter for all rows (the rotary offset `kv_cache.pos`) and masks attention
only causally, so every row of a batch must put its <|bos|> at the same position; with equal k that holds
with no padding inside the sequence. EchoPrime has one embedding per study, so there is a single group.

Several samples per study (num_samples=n) prefill each study once, then copy its cached rows n times.
Rows stop independently at <|eos|> or at max_tokens; a finished row is masked (its tokens are ignored), and
when fewer than half the rows are still writing the cache is compacted to the live ones so late steps stop
paying for finished reports. The loop ends when every row is done.

Sampling: temperature 0 is greedy (argmax); otherwise softmax(logits / temperature), optionally restricted
to the top_k most likely tokens, drawn with one torch.Generator seeded by `seed`. A given seed, input order
and batch_size give the same samples every run on the same device; a different batch_size changes which
draws each row gets (the generator is shared by the batch), greedy output never depends on it.
"""

import numpy as np
import torch
from tqdm import tqdm

from echovlm.common import make_autocast, resolve_dtype
from echovlm.gpt import UNKNOWN


class KVCache:
    """Keys and values of every layer for a batch of rows, preallocated up to max_len positions.

    The model calls insert_kv(layer, k, v) once per attention layer with the new positions' k, v of shape
    (B, H, T_new, head_dim) and attends over what it returns (all positions so far); after the last layer
    it calls advance(T_new). `pos` (the number of cached positions) is its rotary offset for the new tokens.
    """

    def __init__(self, num_layers: int, max_len: int):
        self.num_layers = num_layers
        self.max_len = max_len
        self.pos = 0
        # (L, 2, B, H, max_len, head_dim); allocated at the first insert so it takes the dtype and device that
        # k, v really have (bf16 under autocast, else fp32) without the caller having to know them
        self.kv = None

    def insert_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        B, H, T, hd = k.shape
        if self.kv is None:
            self.kv = torch.empty((self.num_layers, 2, B, H, self.max_len, hd), dtype=k.dtype, device=k.device)
        end = self.pos + T
        if end > self.max_len:
            raise RuntimeError(f"KVCache full: {end} positions needed, {self.max_len} allocated")
        self.kv[layer_idx, 0, :, :, self.pos:end] = k
        self.kv[layer_idx, 1, :, :, self.pos:end] = v
        return self.kv[layer_idx, 0, :, :, :end], self.kv[layer_idx, 1, :, :, :end]

    def advance(self, num_tokens: int):
        self.pos += num_tokens

    def expand(self, n: int):
        """Repeat each row n times in place (row i becomes rows i*n .. i*n+n-1): n samples share one prefill."""
        if n > 1:
            self.kv = self.kv.repeat_interleave(n, dim=2)

    def keep(self, rows: torch.Tensor):
        """Keep only these rows (a long tensor of row indices), in that order."""
        self.kv = self.kv.index_select(2, rows)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None):
    """Next token per row from (B, V) logits: argmax at temperature 0, else a seeded (top-k) softmax draw."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        top_vals, top_idx = torch.topk(logits, top_k, dim=-1)
        choice = torch.multinomial(torch.softmax(top_vals, dim=-1), 1, generator=generator)
        return top_idx.gather(1, choice).squeeze(1)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)


class Engine:
    def __init__(self, model, tokenizer, dtype: str = "auto"):
        """dtype: "bf16" autocast or "fp32"; "auto" is training's choice for this device (echovlm.common
        bf16_native: CUDA and CPUs with native bf16 matmuls), so a model decodes in the precision it was trained in
        on the machine that trained it."""
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.dtype = resolve_dtype(dtype, self.device.type)
        self.autocast = make_autocast(self.device, self.dtype)

    def _check(self, embeddings) -> list[torch.Tensor]:
        embed_dim = self.model.config.embed_dim
        out = []
        for i, e in enumerate(embeddings):
            t = torch.as_tensor(np.asarray(e, dtype=np.float32) if not torch.is_tensor(e) else e).float()
            if t.ndim != 2 or t.shape[0] < 1 or t.shape[1] != embed_dim:
                raise ValueError(f"study {i}: embeddings must be a (k, {embed_dim}) array with k >= 1, "
                                 f"got shape {tuple(t.shape)}")
            if not torch.isfinite(t).all():
                raise ValueError(f"study {i}: embeddings contain NaN or inf")
            out.append(t)
        return out

    @torch.inference_mode()
    def generate(self, embeddings, max_tokens: int | None = None, temperature: float = 0.0, top_k: int | None = None,
                 num_samples: int = 1, seed: int = 0, batch_size: int = 64, progress: bool = False, prompts=None):
        """Report token ids (no bos/eos) for each study: result[study][sample] is a list of ints.

        embeddings: one (k, embed_dim) array or tensor per study. prompts: (codes (N, F), values (N, n_values))
        of echovlm.findings (decide() or prompt_codes()) for a model with a findings prompt; None: free reports. max_tokens: report tokens per sample, at most
        (default) what fits in the model's sequence_len after the k+1 prefix positions. batch_size: rows decoded
        together; a batch holds batch_size // num_samples studies (at least one), each decoded num_samples times.
        """
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        if num_samples < 1 or batch_size < 1:
            raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples} and {batch_size}")
        studies = self._check(embeddings)
        codes, values = self._prompts(prompts, len(studies))
        n_prompt = self.model.config.n_prompt
        seq_len = self.model.config.sequence_len
        by_k: dict[int, list[int]] = {}
        for i, t in enumerate(studies):
            by_k.setdefault(t.shape[0], []).append(i)
        for k in by_k:
            room = seq_len - (k + n_prompt + 1)
            if room < 1 or (max_tokens is not None and max_tokens > room):
                raise ValueError(f"studies with {k} embeddings leave room for {max(room, 0)} report tokens in the "
                                 f"model's sequence_len {seq_len}, but max_tokens={max_tokens} was asked for; "
                                 "lower --max-tokens (or leave it unset)")
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed)
        per_batch = max(1, batch_size // num_samples)
        results: list = [None] * len(studies)
        bar = tqdm(total=len(studies), desc="generate", unit="study", disable=not progress)
        for k in sorted(by_k):
            idx = by_k[k]
            limit = max_tokens if max_tokens is not None else seq_len - (k + n_prompt + 1)
            for start in range(0, len(idx), per_batch):
                chunk = idx[start:start + per_batch]
                rows = self._generate_batch([studies[i] for i in chunk], limit, temperature, top_k, num_samples,
                                            generator, codes[chunk], values[chunk])
                for j, i in enumerate(chunk):
                    results[i] = rows[j * num_samples:(j + 1) * num_samples]
                bar.update(len(chunk))
        bar.close()
        return results

    def generate_text(self, embeddings, **kwargs) -> list[list[str]]:
        """Same as generate, decoded: result[study][sample] is the report text."""
        return [[self.tokenizer.decode(ids) for ids in samples] for samples in self.generate(embeddings, **kwargs)]

    def _prompts(self, prompts, n: int):
        """(codes (n, F), values (n, n_values)) tensors on the device: the given prompts, checked, or all unknown."""
        c = self.model.config
        if prompts is None:
            codes = torch.full((n, c.n_prompt), UNKNOWN, dtype=torch.long)
            values = torch.full((n, c.n_values), float("nan"))
        else:
            if not c.n_prompt:
                raise ValueError("this model has no findings prompt (it was trained before the findings head, or with "
                                 "--no-findings): it writes free reports only; retrain it to prompt findings")
            codes, values = torch.as_tensor(np.asarray(prompts[0])).long(), torch.as_tensor(np.asarray(prompts[1])).float()
            if codes.shape != (n, c.n_prompt) or values.shape != (n, c.n_values):
                raise ValueError(f"prompts must be codes ({n}, {c.n_prompt}) and values ({n}, {c.n_values}), got "
                                 f"{tuple(codes.shape)} and {tuple(values.shape)}")
        return codes.to(self.device), values.to(self.device)

    def _generate_batch(self, studies: list[torch.Tensor], max_tokens: int, temperature: float, top_k: int | None,
                        num_samples: int, generator, codes: torch.Tensor, values: torch.Tensor) -> list[list[int]]:
        tok, dev = self.tokenizer, self.device
        B, k, F = len(studies), studies[0].shape[0], self.model.config.n_prompt
        ids = torch.full((B, k + F + 1), tok.pad_id, dtype=torch.long, device=dev)
        ids[:, k + F] = tok.bos_id
        prefix_mask = torch.zeros((B, k + F + 1), dtype=torch.bool, device=dev)
        prefix_mask[:, :k] = True
        prompt = {}
        if F:
            prompt_mask = torch.zeros_like(prefix_mask)
            prompt_mask[:, k:k + F] = True
            prompt = dict(prompt_codes=codes, prompt_values=values, prompt_mask=prompt_mask)
        prefix = torch.cat(studies).to(dev, dtype=next(self.model.parameters()).dtype)
        # the last sampled token is never fed back, so the cache needs k+F+1 + max_tokens-1 positions
        cache = KVCache(self.model.config.n_layer, k + F + max_tokens)
        with self.autocast:
            logits = self.model(ids, prefix, prefix_mask, kv_cache=cache, **prompt)[:, -1]
        cache.expand(num_samples)
        logits = logits.repeat_interleave(num_samples, dim=0)

        n_rows = B * num_samples
        out: list[list[int]] = [[] for _ in range(n_rows)]
        owner = list(range(n_rows))  # cache row -> output row; changes when the cache is compacted
        live = [True] * n_rows  # per cache row: still writing its report
        no_prefix = prefix[:0]
        for step in range(max_tokens):
            next_ids = sample_next(logits, temperature, top_k, generator)
            for r, t in enumerate(next_ids.tolist()):
                if live[r]:
                    if t == tok.eos_id:
                        live[r] = False
                    else:
                        out[owner[r]].append(t)
            n_live = sum(live)
            if n_live == 0 or step == max_tokens - 1:
                break
            if n_live <= len(live) // 2:
                keep = [r for r in range(len(live)) if live[r]]
                cache.keep(torch.tensor(keep, device=dev))
                next_ids = next_ids[keep]
                owner = [owner[r] for r in keep]
                live = [True] * len(keep)
            step_mask = torch.zeros((len(live), 1), dtype=torch.bool, device=dev)
            with self.autocast:
                logits = self.model(next_ids[:, None], no_prefix, step_mask, kv_cache=cache)[:, -1]
        return out
