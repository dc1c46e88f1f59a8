"""Muon: momentum, then the update orthogonalised by Newton-Schulz iterations, for the 2-D matrices of the blocks.

The token embedding, the study projector and the lm_head stay on torch.optim.AdamW (GPT.setup_optimizers).
"""

import math

import torch


class Muon(torch.optim.Optimizer):
    """torch.optim.Muon's update (same defaults, state and lr adjustment), with Newton-Schulz in `ns_dtype`.

    torch.optim.Muon always orthogonalises in bfloat16, which CPUs without bf16 units (AVX2) emulate: on
    our 2-core test machine that made a depth-4 Muon step take 30 s, ~3x the forward and backward pass. The
    math below is torch's, line for line (tests/test_gpt.py checks equality in bf16); the training CLIs run it
    in their precision (--dtype: bf16 where the device multiplies bf16 natively, echovlm.common.bf16_native).
    """

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 ns_coefficients=(3.4445, -4.775, 2.0315), eps=1e-7, ns_steps=5, ns_dtype=torch.bfloat16):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                      ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps))
        if any(p.ndim != 2 for g in self.param_groups for p in g["params"]):
            raise ValueError("Muon only takes 2-D parameters")
        self.ns_dtype = ns_dtype

    def orthogonalise(self, update: torch.Tensor, group: dict) -> torch.Tensor:
        a, b, c = group["ns_coefficients"]
        x = update.to(self.ns_dtype, copy=True)
        tall = x.size(0) > x.size(1)
        if tall:
            x = x.T
        x.div_(x.norm().clamp(min=group["eps"]))  # spectral norm <= Frobenius norm <= 1
        for _ in range(group["ns_steps"]):
            gram = x @ x.T
            x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        return x.T if tall else x

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = self.orthogonalise(update, group)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * math.sqrt(max(1.0, p.shape[0] / p.shape[1])))
