"""Training batches built on the device from a split held entirely in device memory.

A split is small next to an accelerator (EchoPrime: ~1.2M reports x ~200 tokens, 1.2M x 512 fp16
embeddings, ~2.5 GB), so it is copied to the device once and every batch is a few index gathers there:
no worker processes, no host-to-device copy per step.

Per study the sequence is [e_1 .. e_k, f_1 .. f_F, <|bos|>, report tokens] with next-token targets
[-1 x (k + F), report tokens, <|eos|>] (the prefix and the findings prompt predict nothing; <|bos|> predicts
the first report token; <|eos|> is only ever a target, so it needs no input slot). F is 0 for a model without
a findings prompt; with one, the prompt is the study's own reference labels (echovlm.findings.prompt_codes),
dropped to all-unknown for a seeded fraction of the training studies (--prompt-dropout) so the model also
learns to write without it. A seeded fraction of the prompted studies (--swap-embeddings) reads another
training study's embeddings instead of its own, prompt and report unchanged: where the embeddings and the
prompt disagree, the prompt is what the report states. At inference they disagree wherever the findings head
decides against what the embeddings look like, and wherever a user edits a finding. Rows are right padded
with <|pad|> / -1. A study longer than sequence_len keeps its first sequence_len - k - F - 1 report tokens
(and then predicts the next report token, not <|eos|>); how many reports this cuts is printed once per split.

Order: each epoch is a seeded permutation of the split (with --balance-findings as many seeded draws with
replacement, a study with a rare finding drawn more often: finding_weights). So that little compute goes to
padding, the order is cut into windows of `group_batches` global batches, each window is sorted by length and
cut into global batches, and the batches are shuffled again, so each batch holds studies of similar length
while the batch order stays random. A global batch (total_batch_size studies) is split in length order into
world_size x accum micro batches of device_batch_size; rank r takes micro batches r*accum .. r*accum+accum-1.
Every (world_size, accum) split of one global batch holds the same studies, so 1 GPU with 8 accumulation
steps and 8 GPUs with 1 see the same data at every step.
"""

from dataclasses import dataclass

import numpy as np
import torch

from echovlm.common import print0
from echovlm.findings import label_prompts
from echovlm.gpt import UNKNOWN
from echovlm.vocabulary import BINARY_TRAITS

MAX_DEFAULT_SEQUENCE_LEN = 1024


@dataclass
class Batch:
    ids: torch.Tensor  # (B, T) long: pad_id at prefix and padding slots
    prefix: torch.Tensor  # (P, D) float16: the batch's study embeddings in row-major order of prefix_mask
    prefix_mask: torch.Tensor  # (B, T) bool
    prompt_codes: torch.Tensor | None  # (B, F) long findings prompt codes (None: the model has no prompt)
    prompt_values: torch.Tensor | None  # (B, n_values) float, NaN = unknown
    prompt_mask: torch.Tensor | None  # (B, T) bool, True at the F prompt positions
    targets: torch.Tensor  # (B, T) long, -1 = ignored
    num_targets: int  # report tokens + <|eos|> predicted: the "real tokens" of throughput and loss
    num_positions: int  # B * T: what the model computes
    num_padding: int  # positions that hold nothing (right padding)
    num_truncated: int  # reports cut to fit sequence_len

    @property
    def prompt(self) -> dict:
        """The findings prompt as GPT.forward's keyword arguments (all None for a model without one)."""
        return dict(prompt_codes=self.prompt_codes, prompt_values=self.prompt_values, prompt_mask=self.prompt_mask)


def build_batch(tokens: torch.Tensor, tok_start: np.ndarray, tok_len: np.ndarray, emb: torch.Tensor,
                emb_start: np.ndarray, emb_len: np.ndarray, bos_id: int, eos_id: int, pad_id: int,
                sequence_len: int, pad_multiple: int = 1, codes: torch.Tensor | None = None,
                values: torch.Tensor | None = None) -> Batch:
    """Gather a batch on the device of `tokens`/`emb` for studies given by their token and embedding spans.

    tokens: flat report tokens (any int dtype) on the device; emb: (M, D) embedding rows on the device;
    tok_start/tok_len/emb_start/emb_len: one int per study (host numpy). The row lengths are known on the
    host, so the batch shape never waits on the device. codes (B, F) / values (B, n_values): the studies'
    findings prompts on the device, None for a model without one.
    """
    device = tokens.device
    B = len(tok_len)
    F = 0 if codes is None else codes.shape[1]
    k = emb_len.astype(np.int64)
    if (k < 1).any():
        raise ValueError("every study needs at least one embedding")
    if (k + F + 2 > sequence_len).any():
        raise ValueError(f"a study has {int(k.max())} embeddings: with {F} prompt positions, <|bos|> and one report "
                         f"token that does not fit in sequence_len {sequence_len}")
    k = k + F  # from here on k counts every position before <|bos|>
    n = np.minimum(tok_len.astype(np.int64), sequence_len - k - 1)  # report tokens given as input
    rows = k + 1 + n
    T = int(rows.max())
    T = min(-(-T // pad_multiple) * pad_multiple, sequence_len)  # fewer distinct shapes for torch.compile

    def col(a):
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device, non_blocking=True)[:, None]

    k_d, n_d, full_d, start_d = col(k), col(n), col(tok_len), col(tok_start)
    pos = torch.arange(T, device=device)[None, :]
    rel = pos - k_d - 1  # index into the report of the token at this input position
    is_tok = (rel >= 0) & (rel < n_d)
    gather = (start_d + rel.clamp(min=0)).clamp(max=max(tokens.numel() - 1, 0))
    tok_vals = tokens[gather].long() if tokens.numel() else torch.zeros_like(gather)
    ids = torch.where(is_tok, tok_vals, torch.full_like(pos, pad_id).expand(B, T))
    ids = torch.where(pos == k_d, torch.full_like(ids, bos_id), ids)
    prefix_mask = pos < k_d - F
    prompt_mask = (pos >= k_d - F) & (pos < k_d) if F else None

    # the target at input position p is report token rel+1, or <|eos|> right after the last one
    rel_t = rel + 1
    tgt_gather = (start_d + rel_t.clamp(min=0)).clamp(max=max(tokens.numel() - 1, 0))
    tgt_vals = tokens[tgt_gather].long() if tokens.numel() else torch.zeros_like(tgt_gather)
    predicts = (rel_t >= 0) & (rel_t <= n_d)
    targets = torch.where(rel_t < full_d, tgt_vals, torch.full_like(tgt_vals, eos_id))
    targets = torch.where(predicts, targets, torch.full_like(targets, -1))

    emb_idx = np.concatenate([np.arange(s, s + c) for s, c in zip(emb_start, k - F)])
    prefix = emb[torch.from_numpy(emb_idx).to(device, non_blocking=True)]
    return Batch(ids=ids, prefix=prefix, prefix_mask=prefix_mask, prompt_codes=codes, prompt_values=values,
                 prompt_mask=prompt_mask, targets=targets,
                 num_targets=int((n + 1).sum()), num_positions=B * T, num_padding=int(B * T - rows.sum()),
                 num_truncated=int((n < tok_len).sum()))


def collate(embeddings, token_lists, bos_id: int, eos_id: int, pad_id: int, sequence_len: int, device,
            pad_multiple: int = 1, prompts: tuple[np.ndarray, np.ndarray] | None = None) -> Batch:
    """A batch from in-memory studies: one (k, D) embedding array and one list of report token ids each, and
    for a model with a findings prompt their (codes (B, F), values (B, n_values)) arrays."""
    if len(embeddings) != len(token_lists) or not embeddings:
        raise ValueError(f"collate needs as many token lists as studies (>= 1), got {len(embeddings)} and "
                         f"{len(token_lists)}")
    embs = [np.asarray(e, dtype=np.float16) for e in embeddings]
    if any(e.ndim != 2 for e in embs) or len({e.shape[1] for e in embs}) != 1:
        raise ValueError("every study's embeddings must be a (k, D) array with the same D")
    emb_len = np.array([e.shape[0] for e in embs], dtype=np.int64)
    tok_len = np.array([len(t) for t in token_lists], dtype=np.int64)
    flat = np.concatenate([np.asarray(t, dtype=np.int64) for t in token_lists]) if tok_len.sum() else np.zeros(0, np.int64)
    tokens = torch.from_numpy(flat).to(device)
    emb = torch.from_numpy(np.concatenate(embs)).to(device)
    codes, values = (None, None) if prompts is None else (torch.as_tensor(prompts[0]).long().to(device),
                                                          torch.as_tensor(prompts[1]).float().to(device))
    return build_batch(tokens, np.concatenate([[0], np.cumsum(tok_len)[:-1]]), tok_len, emb,
                       np.concatenate([[0], np.cumsum(emb_len)[:-1]]), emb_len, bos_id, eos_id, pad_id,
                       sequence_len, pad_multiple, codes, values)


class DeviceSplit:
    """One split's report tokens and study embeddings, resident on the device.

    sequence_len None: the split's longest study (prefix + prompt + <|bos|> + report) rounded up to 32, at most
    MAX_DEFAULT_SEQUENCE_LEN. labels: the (N, 25) echovlm.labels matrix of the split's reference reports, for
    a model with a findings prompt (each study is prompted with its own labels); None for one without.
    """

    def __init__(self, tokens: np.ndarray, tok_offsets: np.ndarray, emb: np.ndarray, emb_offsets: np.ndarray,
                 bos_id: int, eos_id: int, pad_id: int, sequence_len: int | None, device, name: str = "split",
                 pad_multiple: int = 1, labels: np.ndarray | None = None):
        tok_offsets, emb_offsets = np.asarray(tok_offsets, np.int64), np.asarray(emb_offsets, np.int64)
        if len(tok_offsets) != len(emb_offsets):
            raise ValueError(f"{name}: {len(tok_offsets) - 1} tokenized reports but {len(emb_offsets) - 1} studies "
                             "with embeddings; re-run scripts.tok_train on this dataset")
        if tok_offsets[-1] != len(tokens) or emb_offsets[-1] != len(emb):
            raise ValueError(f"{name}: offsets do not match the token/embedding arrays (truncated files?); "
                             "re-run scripts.tok_train / scripts.prepare_dataset")
        self.name = name
        self.tok_start, self.tok_len = tok_offsets[:-1], np.diff(tok_offsets)
        self.emb_start, self.emb_len = emb_offsets[:-1], np.diff(emb_offsets)
        if (self.emb_len < 1).any():
            raise ValueError(f"{name}: {int((self.emb_len < 1).sum())} studies have no embedding")
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.labels, self.codes, self.values = labels, None, None
        if labels is not None:
            if len(labels) != len(self.tok_len):
                raise ValueError(f"{name}: labels of {len(labels)} studies, the split has {len(self.tok_len)}; "
                                 "delete the dataset's labels/ folder so that they are computed again")
            codes, values = label_prompts(labels)
            self.codes = torch.from_numpy(np.asarray(codes, dtype=np.int64)).to(device)
            self.values = torch.from_numpy(np.asarray(values, dtype=np.float32)).to(device)
        self.n_prompt = 0 if self.codes is None else self.codes.shape[1]
        self.lengths = self.emb_len + self.n_prompt + 1 + self.tok_len  # input positions each study wants
        if sequence_len is None:
            sequence_len = min(-(-int(self.lengths.max()) // 32) * 32, MAX_DEFAULT_SEQUENCE_LEN)
        self.sequence_len, self.pad_multiple = sequence_len, pad_multiple
        # uint16 tensors have few CUDA kernels: int32 on the device, half the size of long
        self.tokens = torch.from_numpy(np.asarray(tokens).astype(np.int32)).to(device)
        self.emb = torch.from_numpy(np.array(emb, dtype=np.float16)).to(device)  # a copy: the memmap is read-only
        self.device = torch.device(device)
        n_cut = int((self.lengths > sequence_len).sum())
        if n_cut:
            print0(f"{name}: {n_cut} of {len(self)} reports ({n_cut / len(self):.2%}) are longer than sequence_len "
                   f"{sequence_len} and will be truncated")

    def __len__(self) -> int:
        return len(self.tok_len)

    @property
    def embed_dim(self) -> int:
        return self.emb.shape[1]

    def batch(self, idx, drop_prompt=None, embeddings_of=None) -> Batch:
        """The studies idx; drop_prompt (bool per study, or True for all): their findings prompt all unknown;
        embeddings_of (a study index per study, default idx): whose embeddings each row reads."""
        idx = np.asarray(idx, dtype=np.int64)
        emb_idx = idx if embeddings_of is None else np.asarray(embeddings_of, dtype=np.int64)
        codes = values = None
        if self.codes is not None:
            rows = torch.from_numpy(idx).to(self.codes.device)
            codes, values = self.codes[rows], self.values[rows]
            if drop_prompt is not None:
                drop = torch.as_tensor(np.broadcast_to(drop_prompt, idx.shape).copy(), device=codes.device)[:, None]
                codes = torch.where(drop, torch.full_like(codes, UNKNOWN), codes)
                values = torch.where(drop, torch.full_like(values, float("nan")), values)
        return build_batch(self.tokens, self.tok_start[idx], self.tok_len[idx], self.emb, self.emb_start[emb_idx],
                           self.emb_len[emb_idx], self.bos_id, self.eos_id, self.pad_id, self.sequence_len,
                           self.pad_multiple, codes, values)

    def eval_batches(self, num_studies: int, batch_size: int, rank: int = 0, world_size: int = 1,
                     prompted: bool = False):
        """The first num_studies studies (all if <= 0), this rank's share (r, r+W, ...), in length order; with
        their findings prompts when prompted, else with every prompt unknown (what a free report reads)."""
        n = len(self) if num_studies <= 0 else min(num_studies, len(self))
        mine = np.arange(rank, n, world_size)
        mine = mine[np.argsort(self.lengths[mine], kind="stable")]
        for s in range(0, len(mine), batch_size):
            yield self.batch(mine[s:s + batch_size], None if prompted else True)


# the most a study is repeated for its rare findings: a 0.2% finding of a real release would otherwise be drawn
# 100x at floor 0.2 and its few reports learnt by heart; the default synthetic data's rarest (3%) needs 6.25x
MAX_REPEAT = 10.0


def finding_weights(labels: np.ndarray, floor: float) -> np.ndarray:
    """Sampling probabilities over a split's studies: a study whose rarest present finding has training
    prevalence p < floor is drawn floor/p times as often as a study without one, at most MAX_REPEAT times (the
    repeat factor of LVIS's sampling, without its square root). A rare finding's prompt and wording are seen
    more, though not at `floor` of the reports where studies hold several findings: on the default synthetic
    data a 5% finding goes to 8% at floor 0.2."""
    if labels is None:
        raise ValueError("balancing the findings needs the split's labels (a model with a findings prompt)")
    binary = labels[:, :len(BINARY_TRAITS)]
    present = binary > 0.5  # NaN (unsettled) compares False
    prevalence = present.sum(0) / np.maximum((~np.isnan(binary)).sum(0), 1)
    # 1 for a study without a finding below the floor; the guard only spares the unused 0/0 of absent findings
    w = np.clip(np.where(present, floor / np.maximum(prevalence, 1e-9), 1.0).max(axis=1), 1.0, MAX_REPEAT)
    return w / w.sum()


class TrainLoader:
    """Endless epochs of length-grouped global batches; next() gives this rank's micro batches of one step."""

    def __init__(self, split: DeviceSplit, total_batch_size: int, device_batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, group_batches: int = 100, length_grouping: bool = True,
                 prompt_dropout: float = 0.0, swap_embeddings: float = 0.0, balance_findings: float = 0.0):
        per_step = device_batch_size * world_size
        if total_batch_size % per_step:
            raise ValueError(f"--total-batch-size {total_batch_size} must be a multiple of --device-batch-size x "
                             f"world size = {device_batch_size} x {world_size} = {per_step}")
        if len(split) < total_batch_size:
            raise ValueError(f"the {split.name} split has {len(split)} studies, fewer than one global batch of "
                             f"{total_batch_size}: lower --total-batch-size or prepare more studies")
        self.split, self.total, self.micro = split, total_batch_size, device_batch_size
        self.rank, self.world, self.accum = rank, world_size, total_batch_size // per_step
        self.seed, self.group, self.grouping = seed, group_batches, length_grouping
        self.prompt_dropout, self.swap_embeddings = prompt_dropout, swap_embeddings
        self.weights = None if balance_findings <= 0 else finding_weights(split.labels, balance_findings)
        self.batches_per_epoch = len(split) // total_batch_size  # the remainder is dropped, a new one each epoch
        self.epoch, self.pos = 0, 0
        self._order = None
        self.global_stats = {}  # of the last next(): see _stats

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """(batches_per_epoch, total) study indices, each row one global batch in length order."""
        rng = np.random.default_rng([self.seed, epoch])
        if self.weights is None:
            perm = rng.permutation(len(self.split))[:self.batches_per_epoch * self.total]
        else:
            perm = rng.choice(len(self.split), self.batches_per_epoch * self.total, p=self.weights)
        if self.grouping:
            window = self.group * self.total
            for s in range(0, len(perm), window):
                w = perm[s:s + window]
                perm[s:s + window] = w[np.argsort(self.split.lengths[w], kind="stable")]
        batches = perm.reshape(self.batches_per_epoch, self.total)
        batches = batches[rng.permutation(self.batches_per_epoch)]
        # within a batch, length order makes micro batches of similar lengths whatever the split into them
        return np.take_along_axis(batches, np.argsort(self.split.lengths[batches], axis=1, kind="stable"), axis=1)

    def next(self) -> list[Batch]:
        if self._order is None:
            self._order = self._epoch_order(self.epoch)
        studies = self._order[self.pos]
        # drawn for the whole global batch from (seed, epoch, batch): every rank and every resume agrees
        rng = np.random.default_rng([self.seed, self.epoch, self.pos, 1])
        drop = rng.random(len(studies)) < self.prompt_dropout
        swap = ~drop & (rng.random(len(studies)) < self.swap_embeddings)
        # another study of the split, never the study itself
        source = np.where(swap, (studies + rng.integers(1, len(self.split), len(studies))) % len(self.split), studies)
        self.pos += 1
        if self.pos == self.batches_per_epoch:
            self.epoch, self.pos, self._order = self.epoch + 1, 0, None
        self.global_stats = self._stats(studies, source)
        first = self.rank * self.accum
        return [self.split.batch(studies[(first + a) * self.micro:(first + a + 1) * self.micro],
                                 drop[(first + a) * self.micro:(first + a + 1) * self.micro],
                                 source[(first + a) * self.micro:(first + a + 1) * self.micro])
                for a in range(self.accum)]

    def _stats(self, studies: np.ndarray, source: np.ndarray) -> dict:
        """Real targets, positions and padding of the whole global batch (all ranks), from lengths alone: every
        rank knows them without communicating, which is what normalises the loss by the global token count.
        source: whose embeddings each study reads."""
        s, seq = self.split, self.split.sequence_len
        before = s.emb_len[source] + s.n_prompt  # positions before <|bos|>
        n = np.minimum(s.tok_len[studies], seq - before - 1)
        rows = (before + 1 + n).reshape(-1, self.micro)
        T = np.minimum(-(-rows.max(axis=1) // s.pad_multiple) * s.pad_multiple, seq)
        positions = int((T * self.micro).sum())
        return {"targets": int((n + 1).sum()), "positions": positions, "padding": positions - int(rows.sum())}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict):
        self.epoch, self.pos, self._order = int(state["epoch"]), int(state["pos"]), None
