"""Clinical-reward fine-tuning: sample reports, score them against the reference, and a policy-gradient step.

One step of scripts.rl_train, in three parts a test can drive one at a time:

  sample_and_score   G reports per study from the batched KV-cache Engine, each labelled (the same rules as
                     test_inference), checked for contradictions (echovlm.consistency) and rewarded against
                     its study's reference labels (echovlm.reward)
  advantages         reward minus the mean reward of the study's own G samples (group-relative, as GRPO and
                     nanochat's chat_rl): no value network, and a study whose samples all score the same
                     teaches nothing instead of pushing every sample up or down. Not divided by the group's
                     standard deviation: that would make a group whose rewards differ by noise as loud as one
                     that differs by a missed finding
  policy_gradient_step  loss = -sum over sampled tokens (and each report's <|eos|>) of advantage x log p(token),
                     divided by the sampled tokens of the whole global batch, then one optimiser step. Samples
                     are drawn by the weights being updated and used for one step only (on-policy), so the
                     importance ratio is exactly 1 and PPO's clipping would never act; no KL term to the base
                     model either: the small learning rate (a fraction of base_train's) and the short stage keep
                     the policy near the base model, and scripts.rl_train keeps the checkpoint that scores best
                     on a fixed val subset, so a drift that hurts the reports is never the one kept.

A model with a findings prompt is fine-tuned on its free reports (every finding unknown): the reports it
writes prompted state the findings head's decisions, which the reward cannot improve on.
"""

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from echovlm.clinical import extract_labels
from echovlm.consistency import contradictions
from echovlm.findings import free_prompts
from echovlm.loader import collate
from echovlm.reward import RewardWeights, rewards


@dataclass
class Samples:
    """G sampled reports for each of a batch's studies, flattened study-major (row i*G + g)."""
    embeddings: list[np.ndarray]  # one (k, D) array per row (a study's own, repeated G times)
    tokens: list[list[int]]  # report token ids per row (no bos/eos)
    texts: list[str]
    rewards: np.ndarray  # (rows,)
    contradictions: np.ndarray  # (rows,) count per report
    group: int  # G


def label_and_check(texts: list[str], rules=None) -> tuple[list[dict], np.ndarray]:
    """Labels of each report (same extractor as test_inference) and its number of contradictions."""
    return [extract_labels(t, rules) for t in texts], np.array([len(contradictions(t)) for t in texts], dtype=float)


def sample_and_score(engine, embeddings, ref_labels: list[dict], weights: RewardWeights, group: int,
                     temperature: float, top_k: int | None, seed: int, batch_size: int, max_tokens=None,
                     rules=None) -> Samples:
    """G reports per study sampled at `temperature` (one seeded generator), labelled and rewarded."""
    drawn = engine.generate(embeddings, temperature=temperature, top_k=top_k, num_samples=group, seed=seed,
                            batch_size=batch_size, max_tokens=max_tokens)
    tokens = [ids for study in drawn for ids in study]
    texts = [engine.tokenizer.decode(ids) for ids in tokens]
    labels, n_contra = label_and_check(texts, rules)
    refs = [r for r in ref_labels for _ in range(group)]
    r = rewards(labels, refs, weights, n_contra)
    if not np.isfinite(r).all():
        raise FloatingPointError("the reward of a sampled report is not finite; the reward weights or a label "
                                 "extracted from the report are broken")
    rows = [np.asarray(e) for e in embeddings for _ in range(group)]
    return Samples(rows, tokens, texts, r, n_contra, group)


def advantages(reward: np.ndarray, group: int) -> np.ndarray:
    """reward - the mean reward of its study's group (rows are study-major, G per study)."""
    r = np.asarray(reward, dtype=np.float64).reshape(-1, group)
    return (r - r.mean(1, keepdims=True)).reshape(-1)


def policy_gradient_step(train_model, ddp_model, model, optimizers, samples: Samples, adv: np.ndarray,
                         global_tokens: int, tokenizer, sequence_len: int, device_batch_size: int, autocast,
                         world: int) -> float:
    """One optimiser step on this rank's samples; returns their summed -advantage x log p (for logging).

    global_tokens: sampled tokens + one <|eos|> per report, over every rank (the loss's denominator, so the
    gradient does not depend on how the global batch is split over ranks or micro batches). Rows with zero
    advantage are left out: they add nothing to the gradient.
    """
    # a rank with nothing to learn still runs one (zero-weighted) row through the model, so DDP's all-reduce
    # sees the same calls on every rank
    rows = np.flatnonzero(adv != 0) if (adv != 0).any() else np.arange(1)
    device = next(model.parameters()).device
    total = torch.zeros((), device=device, dtype=torch.float64)
    chunks = [rows[s:s + device_batch_size] for s in range(0, len(rows), device_batch_size)]
    for c, chunk in enumerate(chunks):
        sync = nullcontext() if ddp_model is None or c == len(chunks) - 1 else ddp_model.no_sync()
        with sync:
            b = collate([samples.embeddings[i] for i in chunk], [samples.tokens[i] for i in chunk],
                        tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, sequence_len, device,
                        prompts=free_prompts(len(chunk)) if model.config.n_prompt else None)
            with autocast:
                nll = train_model(b.ids, b.prefix, b.prefix_mask, b.targets, loss_reduction="none", **b.prompt)
            weight = torch.tensor(adv[chunk], dtype=torch.float32, device=device)[:, None]
            loss = (nll.view(b.targets.shape) * (b.targets >= 0) * weight).sum()
            # DDP averages gradients over ranks: x world makes the result the global-batch token mean
            (loss * (world / global_tokens)).backward()
            total += loss.detach().double()
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    return float(total)
