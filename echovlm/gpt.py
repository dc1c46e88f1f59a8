"""The report writer: a compact decoder-only transformer that reads study embeddings as a prefix.

Modern nanoGPT/nanochat recipe: rotary position embeddings, RMSNorm without learnable parameters, QK-norm,
ReLU^2 MLP (4x), no biases, untied input/output embeddings, logits soft-capped at 15*tanh(x/15), attention
through F.scaled_dot_product_attention.

One size knob, `depth`: width = 64 * depth and heads of 128 dims (n_head = max(1, width // 128)), so a
deeper model is also a wider one. The query heads share one key/value head (multi-query attention,
kv_heads=1): generating a report reads every cached key and value at every token, which on a CPU is
memory-bound and was about half of a decode step's time; one shared head halves what is read at depth 4 (2
heads). kv_heads=0 is one per query head, the attention of every model made before it. Default depth 8:
width 512, 4 heads, 8 layers; with a 2000-token BPE vocabulary (3 specials included) and 512-d study
embeddings that is 24.3M parameters (22.0M in the blocks).

A study enters as k >= 1 embedding vectors (EchoPrime: one 512-d study embedding). A learned projection
(Linear(embed_dim, width) then RMSNorm, so a projected study vector has the same scale as a token
embedding) maps each to width, and they are scattered into the sequence where `prefix_mask` is True.
Per study the sequence is [e_1 .. e_k, <|bos|>, report tokens, <|eos|>, <|pad|> ...]: right padding
after causal attention never influences a real position, so batches need no attention mask.

Findings prompt (echovlm/findings.py decides the findings; a model with n_findings = n_values = 0 has none):
after the study rows come one position per scored trait, [e_1 .. e_k, f_1 .. f_F, <|bos|>, report ...].
A binary trait's position holds a learned vector for its state (absent, present, unknown); a continuous one
(LVEF, PASP) a learned "stated" or "unknown" vector plus its value's embedding: a learned vector per half
point (exact, for the values training saw often) plus a projection of the value's phase at periods 1, 10,
100 and 1000 (each decimal digit is one angle, so unseen values still read as their digits). Training
prompts with each reference report's own labels and drops the whole prompt (all unknown) for a fraction of
reports, so the same model also writes without one ("free" reports).

Targets are next tokens: the <|bos|> position predicts the first report word, the last report token
predicts <|eos|>; prefix, prompt and padding positions carry -1 (ignored). The prefix is never predicted: it
is a continuous input, not a token.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from echovlm.common import bf16_native
from echovlm.optim import Muon
from echovlm.vocabulary import DEFAULT_VOCAB_SIZE

LOGIT_SOFTCAP = 15.0
HEAD_DIM = 128
# findings prompt: the state codes of a trait's position, and the value range given a vector per half point
ABSENT, PRESENT, UNKNOWN = 0, 1, 2
STATED = 0  # a continuous trait's code when its value is given
VALUE_MAX = 200.0
VALUE_PERIODS = (1.0, 10.0, 100.0, 1000.0)


@dataclass
class GPTConfig:
    depth: int = 8
    vocab_size: int = DEFAULT_VOCAB_SIZE
    embed_dim: int = 512
    sequence_len: int = 256
    n_findings: int = 0  # binary traits in the findings prompt (0: no prompt, a model made before it)
    n_values: int = 0  # continuous traits in it
    kv_heads: int = 1  # key/value heads the query heads share (0: one per query head, models made before it)

    # derived sizes are properties, not fields, so asdict(config) holds only what rebuilds the model
    @property
    def n_layer(self) -> int:
        return self.depth

    @property
    def n_embd(self) -> int:
        return 64 * self.depth

    @property
    def n_head(self) -> int:
        return max(1, self.n_embd // HEAD_DIM)

    @property
    def n_kv_head(self) -> int:
        return self.kv_heads or self.n_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_prompt(self) -> int:
        return self.n_findings + self.n_values


def norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (B, H, T, hd): rotate the two halves of each head as complex pairs by position-dependent angles
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        width = config.n_embd
        self.c_q = nn.Linear(width, width, bias=False)
        self.c_k = nn.Linear(width, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(width, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(width, width, bias=False)

    def forward(self, x, cos, sin, kv_cache=None):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = norm(q), norm(k)  # QK-norm keeps attention logits bounded whatever the residual stream's scale
        # the fp32 rotary tables promote bf16 q/k under autocast; back to v's dtype so that SDPA and the KV
        # cache stay in bf16
        q, k = q.to(v.dtype), k.to(v.dtype)
        if kv_cache is not None:
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)
        T_total, shared = k.shape[2], self.n_kv_head < self.n_head
        if T == T_total:
            # training, or prefill into an empty cache: plain causal attention (query head h reads key/value
            # head h // (n_head / n_kv_head))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=shared)
        elif T == 1:
            # one new token per row attends to everything cached, itself included. The query heads of one
            # key/value head are stacked as its queries, so each cached key and value is read once
            g = self.n_head // self.n_kv_head
            y = F.scaled_dot_product_attention(q.reshape(B, self.n_kv_head, g, self.head_dim), k, v)
            y = y.reshape(B, self.n_head, 1, self.head_dim)
        else:
            raise ValueError(f"attention with {T} new positions over {T_total} cached ones is not supported: "
                             "prefill into an empty cache, then decode one token at a time")
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache=None):
        x = x + self.attn(norm(x), cos, sin, kv_cache)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.depth < 1 or config.vocab_size < 4 or config.embed_dim < 1 or config.sequence_len < 2:
            raise ValueError(f"invalid GPTConfig {config}: depth >= 1, vocab_size >= 4, embed_dim >= 1, "
                             "sequence_len >= 2 are needed")
        if config.kv_heads < 0 or config.n_head % config.n_kv_head:
            raise ValueError(f"invalid GPTConfig {config}: kv_heads must divide the {config.n_head} query heads "
                             "(0: one per query head)")
        self.config = config
        width = config.n_embd
        self.wte = nn.Embedding(config.vocab_size, width)
        self.projector = nn.Linear(config.embed_dim, width, bias=False)
        if config.n_prompt:
            self.prompt_emb = nn.Embedding(3 * config.n_prompt, width)  # (trait, state) -> vector
            self.value_emb = nn.Embedding(int(2 * VALUE_MAX) + 1, width)  # half point -> vector
            self.value_proj = nn.Linear(2 * len(VALUE_PERIODS), width, bias=False)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.lm_head = nn.Linear(width, config.vocab_size, bias=False)
        cos, sin = self._rotary(config.sequence_len, config.head_dim)
        # buffers move with .to(device) but are rebuilt from the config, not saved in checkpoints
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.init_weights()

    @staticmethod
    def _rotary(seq_len: int, head_dim: int, base: float = 10000.0):
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
        return angles.cos()[None, None], angles.sin()[None, None]  # (1, 1, T, hd/2)

    @torch.no_grad()
    def init_weights(self):
        width = self.config.n_embd
        nn.init.normal_(self.wte.weight, std=1.0)
        nn.init.normal_(self.projector.weight, std=self.config.embed_dim ** -0.5)
        if self.config.n_prompt:
            nn.init.normal_(self.prompt_emb.weight, std=1.0)
            nn.init.normal_(self.value_emb.weight, std=1.0)
            nn.init.normal_(self.value_proj.weight, std=(2 * len(VALUE_PERIODS)) ** -0.5)
        # a near-zero output layer starts the model at a uniform next-token distribution
        nn.init.normal_(self.lm_head.weight, std=0.001)
        bound = math.sqrt(3.0) * width ** -0.5  # uniform with std 1/sqrt(fan_in)
        for block in self.blocks:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(lin.weight, -bound, bound)
            # each residual branch starts as the identity; Muon grows it from the first step
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self, context_len: float | None = None) -> float:
        """Training FLOPs per token (forward + backward) in sequences of context_len positions (default: the
        full sequence_len).

        6 per parameter per token for the matmuls (embedding lookups excluded: they are gathers),
        plus 12 * layers * width * T for the attention scores and weighted sums (Chinchilla/nanochat). Length-
        grouped batches are shorter than sequence_len, so MFU passes the batches' real length as T.
        """
        c = self.config
        gathers = [self.wte] + ([self.prompt_emb, self.value_emb] if c.n_prompt else [])
        matmul_params = self.num_params() - sum(e.weight.numel() for e in gathers)
        return 6.0 * matmul_params + 12.0 * c.n_layer * c.n_embd * (context_len or c.sequence_len)

    def setup_optimizers(self, matrix_lr=0.02, embedding_lr=0.2, projector_lr=0.02, unembedding_lr=0.004,
                         weight_decay=0.0, betas=(0.8, 0.95), ns_dtype=None):
        """[AdamW for the token embedding, projector and lm_head; Muon for every 2-D block matrix].

        AdamW learning rates are given for width 768 and scaled by 1/sqrt(width/768) (as nanochat), so
        the same flags suit every depth. Muon orthogonalises each matrix's momentum, so its update size does
        not depend on the gradient's scale; its lr adjustment (lr * sqrt(max(1, rows/cols)), torch's
        default) is the one nanochat's Muon uses, for which lr 0.02 is tuned.
        Each group keeps its base lr in "initial_lr": the training schedule multiplies that. Muon's Newton-Schulz
        runs in ns_dtype, the training precision (base_train and rl_train pass their --dtype's); None: bf16 where
        the device multiplies it natively (echovlm.common.bf16_native), else fp32.
        """
        scale = (self.config.n_embd / 768) ** -0.5
        adam_groups = [
            dict(params=[self.wte.weight], lr=embedding_lr * scale),
            dict(params=[self.projector.weight], lr=projector_lr * scale),
            dict(params=[self.lm_head.weight], lr=unembedding_lr * scale),
        ]
        if self.config.n_prompt:  # the prompt's vectors are embeddings like the tokens'; its projection a projector
            adam_groups += [dict(params=[self.prompt_emb.weight, self.value_emb.weight], lr=embedding_lr * scale),
                            dict(params=[self.value_proj.weight], lr=projector_lr * scale)]
        adamw = torch.optim.AdamW(adam_groups, betas=betas, eps=1e-10, weight_decay=weight_decay)
        if ns_dtype is None:
            ns_dtype = torch.bfloat16 if bf16_native(self.lm_head.weight.device.type) else torch.float32
        muon = Muon(self.blocks.parameters(), lr=matrix_lr, momentum=0.95, weight_decay=weight_decay, ns_dtype=ns_dtype)
        optimizers = [adamw, muon]
        for opt in optimizers:
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"]
        return optimizers

    def embed_prompt(self, codes: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """(B, F, width) prompt vectors from codes (B, F) long (ABSENT/PRESENT/UNKNOWN; STATED/UNKNOWN for the
        continuous traits, which come last) and values (B, n_values) float (NaN where unknown)."""
        c = self.config
        slot = torch.arange(c.n_prompt, device=codes.device)
        e = self.prompt_emb(codes.long() + 3 * slot)
        known = ~torch.isnan(values)
        v = torch.nan_to_num(values.float()).clamp(0.0, VALUE_MAX)
        angles = 2 * math.pi * v[..., None] / torch.tensor(VALUE_PERIODS, device=v.device)
        num = self.value_emb((2 * v).round().long()) + self.value_proj(torch.cat([angles.cos(), angles.sin()], -1))
        e = torch.cat([e[:, :c.n_findings], e[:, c.n_findings:] + num * known[..., None]], dim=1)
        return norm(e)

    def forward(self, ids, prefix, prefix_mask, targets=None, kv_cache=None, loss_reduction="mean",
                prompt_codes=None, prompt_values=None, prompt_mask=None):
        """ids (B, T) long, pad_id at prefix slots; prefix (P, embed_dim): the batch's study embeddings in
        row-major order of prefix_mask's True entries (P == prefix_mask.sum()); targets (B, T), -1 = ignore.
        A model with a findings prompt also takes prompt_codes (B, F), prompt_values (B, n_values) and
        prompt_mask (B, T), True at each row's F prompt positions (None: a step that feeds no prompt).

        Returns the loss (mean over non-ignored targets, or their sum with loss_reduction="sum") when
        targets are given, else float32 logits (B, T, V). With a kv_cache, T counts only the new positions.
        """
        B, T = ids.shape
        if prefix.ndim != 2 or prefix.shape[1] != self.config.embed_dim:
            raise ValueError(f"prefix must be (P, {self.config.embed_dim}), got {tuple(prefix.shape)}")
        pos = kv_cache.pos if kv_cache is not None else 0
        if pos + T > self.config.sequence_len:
            raise ValueError(f"{pos + T} positions exceed the model's sequence_len {self.config.sequence_len}")
        cos, sin = self.cos[:, :, pos:pos + T], self.sin[:, :, pos:pos + T]

        x = self.wte(ids)
        if prefix.shape[0] > 0:
            p = norm(self.projector(prefix.to(self.projector.weight.dtype)))
            # masked_scatter fills the True slots in row-major order with consecutive rows of p
            x = x.masked_scatter(prefix_mask.unsqueeze(-1), p.to(x.dtype))
        if prompt_mask is not None and self.config.n_prompt:
            e = self.embed_prompt(prompt_codes, prompt_values)
            x = x.masked_scatter(prompt_mask.unsqueeze(-1), e.reshape(-1, e.shape[-1]).to(x.dtype))
        x = norm(x)
        for block in self.blocks:
            x = block(x, cos, sin, kv_cache)
        x = norm(x)
        if kv_cache is not None:
            kv_cache.advance(T)

        logits = self.lm_head(x).float()
        logits = LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)
