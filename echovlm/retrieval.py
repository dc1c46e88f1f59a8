"""Nearest training studies by cosine similarity of mean study embeddings: the retrieval baseline of
scripts.test_inference and the "snap" conditioning of scripts.generate_report.

The training split (1.2M studies on EchoPrime) is read from the dataset's memmap in chunks and a running top-k
is merged, so memory is one chunk of embeddings plus a (query block x chunk) similarity matrix, never
N x N_train.
"""

import numpy as np
import torch


def mean_embeddings(emb, offsets, start: int, stop: int, device) -> torch.Tensor:
    """L2-normalised mean embedding of studies start..stop-1 of an (emb, offsets) block, float32 on device."""
    rows = torch.from_numpy(np.asarray(emb[offsets[start]:offsets[stop]], dtype=np.float32)).to(device)
    counts = torch.from_numpy(np.diff(offsets[start:stop + 1])).to(device)
    owner = torch.repeat_interleave(torch.arange(stop - start, device=device), counts)
    sums = torch.zeros(stop - start, rows.shape[1], device=device).index_add_(0, owner, rows)
    return torch.nn.functional.normalize(sums, dim=1)


def nearest_training_studies(ds, query: torch.Tensor, k: int, device, chunk: int = 32768):
    """(indices, cosines), both (N, k) numpy arrays, best first: the k training studies of prepared dataset ds
    most similar to each (normalised) query row of the (N, D) query."""
    emb, offsets = ds.embedding_block("train")
    n_train, n = len(offsets) - 1, query.shape[0]
    k = min(k, n_train)
    best_sim = torch.full((n, k), -float("inf"), device=device)
    best_idx = torch.zeros((n, k), dtype=torch.long, device=device)
    block = max(1, (1 << 26) // chunk)  # query rows per matmul: at most 64M similarities (256 MB) at a time
    for start in range(0, n_train, chunk):
        stop = min(start + chunk, n_train)
        keys = mean_embeddings(emb, offsets, start, stop, device)
        for q0 in range(0, n, block):
            q1 = min(q0 + block, n)
            sims = torch.cat([best_sim[q0:q1], query[q0:q1] @ keys.T], dim=1)
            cand = torch.cat([best_idx[q0:q1], torch.arange(start, stop, device=device).expand(q1 - q0, -1)], dim=1)
            best_sim[q0:q1], top = sims.topk(k, dim=1)
            best_idx[q0:q1] = cand.gather(1, top)
    return best_idx.cpu().numpy(), best_sim.cpu().numpy()
