"""One policy-gradient step on fixed samples, each rank on its share of the studies; rank 0 saves the weights.

    python tests/rl_step_worker.py RUN OUT.pt                                   # 1 process, every study
    torchrun --standalone --nproc_per_node=2 tests/rl_step_worker.py RUN OUT.pt  # 2 gloo processes

tests/test_rl.py runs both and compares the weights: echovlm.rl's loss is normalised by the global batch's
sampled tokens, so splitting the studies over ranks must not change the update.
"""

import sys
from contextlib import nullcontext

import numpy as np
import torch

from echovlm.checkpoint import load_model
from echovlm.clinical import extract_labels
from echovlm.common import compute_cleanup, compute_init, seed_everything
from echovlm.dataset import open_dataset
from echovlm.engine import Engine
from echovlm.reward import RewardWeights
from echovlm.rl import Samples, advantages, policy_gradient_step, sample_and_score

STUDIES, GROUP = 4, 3


def fixed_samples(model, tokenizer, dataset) -> Samples:
    """The same samples in every process: the same weights, studies and seed."""
    refs = [extract_labels(r) for r in dataset.reports("train")[:STUDIES]]
    weights = RewardWeights.from_labels([extract_labels(r) for r in dataset.reports("train")[:100]])
    return sample_and_score(Engine(model, tokenizer, "fp32"), dataset.embeddings("train")[:STUDIES], refs, weights, GROUP,
                            temperature=1.0, top_k=None, seed=7, batch_size=16, max_tokens=40)


def main(run: str, out: str):
    ddp, rank, _, world, device = compute_init("cpu")
    try:
        seed_everything(0)
        model, tokenizer, info = load_model(run, device)
        samples = fixed_samples(model, tokenizer, open_dataset(info["dataset"]))
        # a model trained 2 steps states no findings, so every sample would earn the same reward: fixed, varied
        # rewards make the step move the weights (the update, not the reward, is what is compared)
        samples.rewards = np.random.default_rng(0).random(len(samples.tokens))
        adv = advantages(samples.rewards, GROUP)
        # this rank's studies r, r+W, ... with all of their G samples, as rl_train splits a step
        rows = np.array([s * GROUP + g for s in range(rank, STUDIES, world) for g in range(GROUP)])
        mine = Samples([samples.embeddings[i] for i in rows], [samples.tokens[i] for i in rows],
                       [samples.texts[i] for i in rows], samples.rewards[rows], samples.contradictions[rows], GROUP)
        global_tokens = sum(len(t) + 1 for t in samples.tokens)
        model.train()
        # fp32 throughout, whatever the CPU: bf16 would turn the all-reduce's summation-order rounding into bf16
        # steps, and what is compared is the split over ranks, not the precision
        optimizers = model.setup_optimizers(matrix_lr=0.01, embedding_lr=0.01, projector_lr=0.01, unembedding_lr=0.01,
                                            ns_dtype=torch.float32)
        ddp_model = torch.nn.parallel.DistributedDataParallel(model) if ddp else None
        policy_gradient_step(ddp_model or model, ddp_model, model, optimizers, mine, adv[rows], global_tokens,
                             tokenizer, model.config.sequence_len, 2, nullcontext(), world)
        if rank == 0:
            torch.save({"state": model.state_dict(), "rewards": samples.rewards, "adv": adv}, out)
    finally:
        compute_cleanup()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
