"""The findings head: what a study's embeddings say about each scored trait, decided before any text is written.

From a study's clip embeddings (any number: their L2-normalised mean, as the retrieval baseline uses) a small
network gives a probability for each of the 23 binary traits and a value for LVEF and PASP. It is trained on
the cached study embeddings and the evaluator's labels of the reference reports (echovlm.labels), apart from
the GPT, so its optimisation is not bounded by the GPT's step budget, in two stages: the linear part first,
full batch to convergence (L-BFGS; a regularised logistic regression per finding and a ridge per value, the
L2 strength chosen on val: the probe baseline, fitted as well as it can be), then an MLP correction on top,
early-stopped on val and kept only where it lowers the val loss. About 35 s on 2 CPU cores for 20k studies;
on a GPU the 1.2M studies of the EchoPrime release fit in memory at once.

Why a separate head: the report writer learns findings only through the tokens that spell them, a weak and
rare signal for a 2%-prevalence finding; a direct classifier on the same embeddings reads them far better (the
probe baseline of scripts.test_inference). The head decides, the GPT states what it decided (findings-prompted
generation, echovlm.gpt, checked by echovlm.faithful), and a clinician can override any decision before the
report is written.

Imbalance: the loss is plain (unweighted) cross-entropy, so the probabilities stay calibrated (the expected
calibration error is reported), and the imbalance is handled where the decision is made: each trait's
probability against a threshold chosen on the val split for balanced accuracy (choose_thresholds: the
training prevalence, optimal for calibrated probabilities, or the val-optimised cut, whichever scores better
on held-out halves of val). A trait the rule set never settles in training (EchoPrime's rules do not define
every trait) is unusable: its prompt says unknown.

The values are regressed in standardised units (mean squared error over the studies whose report states one)
and returned in the trait's units.
"""

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from echovlm.gpt import ABSENT, PRESENT, STATED, UNKNOWN
from echovlm.vocabulary import BINARY_TRAITS, CONTINUOUS_TRAITS, TRAITS

NB, NV = len(BINARY_TRAITS), len(CONTINUOUS_TRAITS)
# the range a user may set a value to with --finding (and the page's editor): physiological, not the parser's
VALUE_RANGES = {"ejection_fraction": (5.0, 90.0), "pulmonary_artery_pressure_continuous": (5.0, 150.0)}
ECE_BINS = 10
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)  # L2 strengths (per-study mean loss units) tried for the linear part


def mean_features(embeddings) -> np.ndarray:
    """(N, D) float32: each study's L2-normalised mean clip embedding, from one (k, D) array per study."""
    x = np.stack([np.asarray(e, dtype=np.float32).reshape(-1, np.shape(e)[-1]).mean(0) for e in embeddings])
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@torch.no_grad()
def split_features(split, chunk: int = 1 << 18) -> np.ndarray:
    """mean_features of every study of a loader.DeviceSplit (its embeddings already on the device), a chunk of
    studies at a time so that a 1.2M-study split never needs a float32 copy of all its rows."""
    out = []
    for a in range(0, len(split), chunk):
        b = min(a + chunk, len(split))
        lo, hi = int(split.emb_start[a]), int(split.emb_start[b - 1] + split.emb_len[b - 1])
        owner = torch.repeat_interleave(torch.arange(b - a), torch.from_numpy(split.emb_len[a:b])).to(split.emb.device)
        sums = torch.zeros(b - a, split.embed_dim, device=split.emb.device).index_add_(0, owner, split.emb[lo:hi].float())
        out.append(F.normalize(sums, dim=1).cpu().numpy())
    return np.concatenate(out)


class Branch(nn.Module):
    """A linear map plus a one-hidden-layer MLP beside it (hidden 0: linear only)."""

    def __init__(self, embed_dim: int, outputs: int, hidden: int):
        super().__init__()
        self.linear = nn.Linear(embed_dim, outputs)
        self.mlp = nn.Sequential(nn.Linear(embed_dim, hidden), nn.GELU(), nn.Linear(hidden, outputs)) if hidden else None
        if self.mlp is not None:  # the MLP starts as no correction at all: the head starts as its linear part
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.zeros_(self.mlp[2].bias)

    def forward(self, z, linear_only: bool = False):
        return self.linear(z) + (self.mlp(z) if self.mlp is not None and not linear_only else 0.0)


class FindingsHead(nn.Module):
    """features (N, D) -> (logits (N, 23), standardised values (N, 2)), on features standardised by the training
    split's statistics. Two branches that share nothing, so that each is early-stopped at its own best epoch
    (the classifiers overfit long before the regressions converge)."""

    def __init__(self, embed_dim: int, hidden: int):
        super().__init__()
        self.embed_dim, self.hidden = embed_dim, hidden
        self.binary = Branch(embed_dim, NB, hidden)
        self.values = Branch(embed_dim, NV, hidden)
        # set by fit(), saved with the weights
        for name, size in (("x_mean", embed_dim), ("x_std", embed_dim), ("y_mean", NV), ("y_std", NV),
                           ("thresholds", NB)):
            self.register_buffer(name, torch.zeros(size) if "mean" in name or name == "thresholds" else torch.ones(size))
        self.register_buffer("usable", torch.zeros(NB + NV, dtype=torch.bool))

    def forward(self, x: torch.Tensor, linear_only: bool = False):
        z = (x - self.x_mean) / self.x_std
        return self.binary(z, linear_only), self.values(z, linear_only)

    @torch.no_grad()
    def predict(self, features: np.ndarray) -> dict:
        """prob (N, 23), decision (N, 23) 0/1, value (N, 2) in the traits' units; NaN where a trait is unusable."""
        self.eval()
        dev = self.x_mean.device
        logits, values = self(torch.as_tensor(np.asarray(features, dtype=np.float32), device=dev))
        prob = torch.sigmoid(logits).cpu().numpy().astype(np.float64)
        value = (values * self.y_std + self.y_mean).cpu().numpy().astype(np.float64)
        usable = self.usable.cpu().numpy()
        prob[:, ~usable[:NB]] = np.nan
        value[:, ~usable[NB:]] = np.nan
        decision = np.where(np.isnan(prob), np.nan, (prob >= self.thresholds.cpu().numpy()).astype(float))
        return {"prob": prob, "decision": decision, "value": value}

    def to_checkpoint(self) -> dict:
        return {"embed_dim": self.embed_dim, "hidden": self.hidden, "state": self.state_dict(),
                "traits": list(TRAITS)}

    @staticmethod
    def from_checkpoint(entry: dict, path) -> "FindingsHead":
        if not isinstance(entry, dict) or entry.get("traits") != list(TRAITS):
            raise ValueError(f"{path}: its findings head scores other traits than this version's; retrain the model")
        try:
            head = FindingsHead(int(entry["embed_dim"]), int(entry["hidden"]))
            head.load_state_dict(entry["state"], strict=True)
        except (RuntimeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: its findings head does not load ({' '.join(str(e).split())[:200]}); the file "
                             "was edited or damaged, use the run's other checkpoint or retrain") from None
        return head.eval()


# ------------------------------------------------------------------ prompts: labels or decisions -> prompt codes

def prompt_codes(binary: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes (N, 25) int64, values (N, 2) float32) for the GPT's findings prompt from binary labels (N, 23) and
    values (N, 2), NaN meaning unknown (the report does not settle it / the rules do not define it)."""
    binary, values = np.asarray(binary, dtype=np.float64), np.asarray(values, dtype=np.float32)
    codes = np.where(np.isnan(binary), UNKNOWN, np.where(binary > 0.5, PRESENT, ABSENT))
    codes = np.concatenate([codes, np.where(np.isnan(values), UNKNOWN, STATED)], axis=1).astype(np.int64)
    return codes, values


def free_prompts(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts that say nothing (every finding unknown): what a free report is written from."""
    return prompt_codes(np.full((n, NB), np.nan), np.full((n, NV), np.nan))


def label_prompts(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Prompts from an echovlm.labels matrix (N, 25) in TRAITS order: each report's own labels (training)."""
    return prompt_codes(labels[:, :NB], labels[:, NB:])


def parse_overrides(items: list[str], head: "FindingsHead | None" = None) -> dict[str, float]:
    """{trait: value} from "name=value" strings (generate_report --finding, the page's editor). Raises ValueError
    with one line for an unknown name, a duplicate, a value out of range or a trait the model's rules never
    settled (so its head cannot have learned it)."""
    out = {}
    for item in items:
        name, sep, raw = str(item).partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"--finding {item!r}: expected NAME=VALUE, e.g. aortic_stenosis=1 or ejection_fraction=35")
        if name not in TRAITS:
            raise ValueError(f"--finding {name}: unknown finding; known: {', '.join(TRAITS)}")
        if name in out:
            raise ValueError(f"--finding {name} is given twice")
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"--finding {name}={raw}: not a number") from None
        if name in BINARY_TRAITS and value not in (0.0, 1.0):
            raise ValueError(f"--finding {name}={raw}: a binary finding is 0 (absent) or 1 (present)")
        if name in VALUE_RANGES:
            lo, hi = VALUE_RANGES[name]
            if not lo <= value <= hi:
                raise ValueError(f"--finding {name}={raw}: out of range, expected {lo:g} to {hi:g}")
        if head is not None and not bool(head.usable[list(TRAITS).index(name)]):
            raise ValueError(f"--finding {name}: the rule set this model was trained with does not define it, so the "
                             "model cannot state it")
        out[name] = value
    return out


def decide(head: FindingsHead, features: np.ndarray, overrides: dict[str, float] | None = None) -> dict:
    """The head's findings for each study, with overrides (trait -> value, the same for every study) replacing
    its decisions: prob, decision, value as in predict(), plus codes/values (the GPT's prompt) and `edited`
    (the overridden trait names)."""
    out = head.predict(features)
    binary, values = out["decision"].copy(), out["value"].copy()
    for name, v in (overrides or {}).items():
        if name in BINARY_TRAITS:
            binary[:, BINARY_TRAITS.index(name)] = v
        else:
            values[:, CONTINUOUS_TRAITS.index(name)] = v
    out["codes"], out["values"] = prompt_codes(binary, values)
    out["decision"], out["value"] = binary, values
    out["edited"] = sorted(overrides or {})
    return out


# ------------------------------------------------------------------ training

def balanced_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The probability threshold with the highest balanced accuracy (mean of sensitivity and specificity) on
    (y, p), over every cut between distinct probabilities, by sorting once; the cut's midpoint is returned."""
    order = np.argsort(-p, kind="stable")
    ps, ys = p[order], y[order]
    pos, neg = max(ys.sum(), 1), max((1 - ys).sum(), 1)
    tp, fp = np.cumsum(ys), np.cumsum(1 - ys)  # predicting the top i + 1 studies positive
    ba = 0.5 * (tp / pos + (neg - fp) / neg)
    ba[:-1][ps[1:] == ps[:-1]] = -1.0  # a cut inside a run of equal probabilities cannot be made
    j = int(np.argmax(ba))
    return float(0.5 * (ps[j] + ps[j + 1]) if j + 1 < len(ps) else ps[j])


def _kept(which) -> str:
    return f"MLP correction after epoch {which + 1}" if isinstance(which, int) else f"linear only ({which})"


def choose_thresholds(y: np.ndarray, p: np.ndarray, prevalence: np.ndarray, usable: np.ndarray, seed: int = 0):
    """(thresholds (23,), the rule chosen, held-out balanced accuracy of each rule) from val labels y and
    probabilities p (N, 23). Two rules: each trait's training prevalence (the balanced-accuracy-optimal cut
    for calibrated probabilities) or the cut that maximises balanced accuracy on val itself (corrects a
    miscalibrated head, but follows the noise of a few dozen rare positives). Which one decides is settled on
    val by two-fold cross-fitting: fit the cuts on one half, score both rules on the other, and back."""
    def cuts(rows):
        out = []
        for j in range(y.shape[1]):
            ok = ~np.isnan(y[rows, j])
            yy, pp = y[rows, j][ok], p[rows, j][ok]
            out.append(balanced_threshold(yy, pp) if usable[j] and 0 < yy.sum() < len(yy) else prevalence[j])
        return np.array(out)

    def mean_ba(rows, t):
        bas = []
        for j in range(y.shape[1]):
            ok = ~np.isnan(y[rows, j])
            yy, pred = y[rows, j][ok], p[rows, j][ok] >= t[j]
            if usable[j] and 0 < yy.sum() < len(yy):
                bas.append(0.5 * (pred[yy == 1].mean() + (~pred[yy == 0]).mean()))
        return float(np.mean(bas)) if bas else 0.0

    order = np.random.default_rng(seed).permutation(len(y))
    halves = (order[::2], order[1::2])
    scores = {"prevalence": [], "val-optimised": []}
    for fit, held in (halves, halves[::-1]):
        scores["prevalence"].append(mean_ba(held, prevalence))
        scores["val-optimised"].append(mean_ba(held, cuts(fit)))
    heldout = {k: float(np.mean(v)) for k, v in scores.items()}
    rule = max(heldout, key=heldout.get)
    thresholds = prevalence if rule == "prevalence" else cuts(np.arange(len(y)))
    return [float(t) for t in thresholds], rule, heldout


def calibration(y: np.ndarray, p: np.ndarray, bins: int = ECE_BINS) -> dict:
    """Expected calibration error over (study, trait) pairs and the reliability table (equal-width bins)."""
    ok = ~np.isnan(y) & ~np.isnan(p)
    y, p = y[ok], p[ok]
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    table = []
    ece = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            table.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": int(m.sum()),
                          "mean_prob": float(p[m].mean()), "frequency": float(y[m].mean())})
            ece += m.sum() / len(p) * abs(p[m].mean() - y[m].mean())
    return {"ece": float(ece), "pairs": int(len(p)), "bins": table}


def fit_head(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, hidden: int = 256,
             epochs: int = 100, batch_size: int = 512, lr: float = 1e-3, weight_decay: float = 0.05,
             patience: int = 10, seed: int = 0, device="cpu", log=print) -> tuple[FindingsHead, dict]:
    """Train a FindingsHead on (features, labels) with labels (N, 25) in TRAITS order (NaN = unsettled), keep the
    epoch with the lowest val loss, set the decision thresholds on val. Returns (head on CPU, summary). The
    global RNG is left as it was: base_train fits the head between seeding and training."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _fit_head(train_x, train_y, val_x, val_y, hidden, epochs, batch_size, lr, weight_decay, patience,
                         seed, device, log)


def _fit_head(train_x, train_y, val_x, val_y, hidden, epochs, batch_size, lr, weight_decay, patience, seed, device,
              log):
    gen = torch.Generator().manual_seed(seed)
    dev = torch.device(device)
    xt, xv = (torch.as_tensor(np.asarray(a, dtype=np.float32), device=dev) for a in (train_x, val_x))
    yt, yv = (torch.as_tensor(np.asarray(a, dtype=np.float32), device=dev) for a in (train_y, val_y))
    head = FindingsHead(xt.shape[1], hidden).to(dev)
    head.x_mean.copy_(xt.mean(0))
    head.x_std.copy_(xt.std(0).clamp(min=1e-6))
    settled = ~torch.isnan(yt)
    # a trait needs both classes (binary) or a few values (continuous) in training to be learned at all
    usable = torch.cat([(settled[:, :NB] & (yt[:, :NB] > 0.5)).any(0) & (settled[:, :NB] & (yt[:, :NB] < 0.5)).any(0),
                        settled[:, NB:].sum(0) >= 10])
    head.usable.copy_(usable)
    for j in range(NV):
        v = yt[settled[:, NB + j], NB + j]
        if len(v) >= 2:
            head.y_mean[j], head.y_std[j] = v.mean(), v.std().clamp(min=1e-6)

    def losses(x, y, linear_only=False):
        """(binary loss, value loss): each trait counts equally, whatever share of studies settle it."""
        logits, values = head(x, linear_only)
        ok_b = ~torch.isnan(y[:, :NB]) & usable[:NB]
        lb = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(y[:, :NB]), reduction="none")
        z = (y[:, NB:] - head.y_mean) / head.y_std
        ok_v = ~torch.isnan(z) & usable[NB:]
        lv = (values - torch.nan_to_num(z)).square()
        per_b = (lb * ok_b).sum(0) / ok_b.sum(0).clamp(min=1)
        per_v = (lv * ok_v).sum(0) / ok_v.sum(0).clamp(min=1)
        return per_b.sum() / usable[:NB].sum().clamp(min=1), per_v.sum() / usable[NB:].sum().clamp(min=1)

    branches = {"binary": head.binary, "values": head.values}

    def snapshot(module):
        return {name: v.detach().clone() for name, v in module.state_dict().items()}

    # stage 1, the linear maps alone: full-batch L-BFGS with an L2 penalty, the strength chosen on val per branch
    # (a regularised logistic regression per finding and a ridge per value: the probe baseline, fitted well);
    # the MLPs, still zero, are left out of these passes: they would cost 20x the linear maps' arithmetic
    best = {k: (float("inf"), None, None) for k in branches}  # (val loss, what was kept, state) per branch
    linear = [p for b in branches.values() for p in b.linear.parameters()]
    for l2 in L2_GRID:
        for p in linear:
            nn.init.zeros_(p)
        opt = torch.optim.LBFGS(linear, max_iter=200, history_size=20, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad(set_to_none=True)
            loss = sum(losses(xt, yt, linear_only=True)) + 0.5 * l2 * sum(b.linear.weight.square().sum() for b in branches.values())
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            val = dict(zip(branches, (float(v) for v in losses(xv, yv, linear_only=True))))
        for k, module in branches.items():
            if val[k] < best[k][0]:
                best[k] = (val[k], f"l2 {l2:g}", snapshot(module))
    for k, module in branches.items():
        module.load_state_dict(best[k][2])
    linear_only = {k: b[:2] for k, b in best.items()}

    # stage 2, an MLP correction on top of the frozen linear maps, early-stopped on val per branch: the linear
    # fit itself stays the candidate to beat, so the correction is kept only where it lowers the val loss
    mlp = [p for b in branches.values() if b.mlp is not None for p in b.mlp.parameters()]
    opt = torch.optim.AdamW(mlp or [torch.zeros(1, requires_grad=True)], lr=lr, weight_decay=weight_decay)
    history = []
    n = len(xt)
    # at most 256 steps an epoch: a 1.2M-study split then takes seconds an epoch on a GPU, not minutes
    batch_size = max(batch_size, -(-n // 256))
    for epoch in range(epochs if mlp else 0):
        head.train()
        perm = torch.randperm(n, generator=gen).to(dev)
        for s in range(0, n, batch_size):
            idx = perm[s:s + batch_size]
            loss = sum(losses(xt[idx], yt[idx]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        head.eval()
        with torch.no_grad():
            val = dict(zip(branches, (float(v) for v in losses(xv, yv))))
        history.append(val)
        if not all(np.isfinite(v) for v in val.values()):
            raise ValueError(f"the findings head's val loss became {val} at epoch {epoch}: the embeddings hold NaN/inf "
                             "or the labels are damaged")
        for k, module in branches.items():
            if val[k] < best[k][0] - 1e-5:
                best[k] = (val[k], epoch, snapshot(module))
        last = [b[1] if isinstance(b[1], int) else -1 for b in best.values()]
        if all(epoch - e >= patience for e in last):
            break
    for k, module in branches.items():
        module.load_state_dict(best[k][2])
    head = head.cpu().eval()
    pred = head.predict(val_x)
    vy = np.asarray(val_y, dtype=np.float64)
    settled = ~np.isnan(train_y[:, :NB])
    prevalence = np.nansum(train_y[:, :NB], 0) / np.maximum(settled.sum(0), 1)
    thresholds, rule, heldout = choose_thresholds(vy[:, :NB], pred["prob"], prevalence, head.usable[:NB].numpy(), seed)
    head.thresholds.copy_(torch.tensor(thresholds))
    summary = {"epochs": len(history), "kept": {k: _kept(b[1]) for k, b in best.items()},
               "val_loss": {k: b[0] for k, b in best.items()}, "linear_only": linear_only, "hidden": hidden,
               "train_studies": int(n), "usable": [t for t, u in zip(TRAITS, head.usable.tolist()) if u],
               "thresholds": dict(zip(BINARY_TRAITS, thresholds)), "threshold_rule": rule,
               "threshold_heldout_balanced_accuracy": heldout,
               "val_calibration": calibration(vy[:, :NB].ravel(), pred["prob"].ravel())}
    log(f"findings head on {n:,} studies: val loss findings {best['binary'][0]:.4f} (linear {linear_only['binary'][0]:.4f}, "
        f"{linear_only['binary'][1]}; kept: {_kept(best['binary'][1])}), values {best['values'][0]:.4f} (linear "
        f"{linear_only['values'][0]:.4f}, {linear_only['values'][1]}; kept: {_kept(best['values'][1])}), "
        f"{int(head.usable.sum())}/{NB + NV} traits usable, val ECE {summary['val_calibration']['ece']:.4f}, "
        f"thresholds: {rule} (held-out val balanced accuracy {heldout[rule]:.4f})")
    return head, summary
