"""The toy model of *3D-Properties* (Yan et al., arXiv 2406.07327 §3.2), exactly as in the method spec.

4 prompts (one-hot) and 10 discrete responses; a three-Linear-layer MLP with a softmax over the responses.
Responses 0–3 are the chosen block (i is optimal for prompt i), 4–7 the rejected block, 8–9 never appear
in the data. One pair per prompt, the paper's draw: x0: 0≻4, x1: 1≻6, x2: 2≻7, x3: 3≻5. The MLP is first
trained (SFT) to output one hand-set row for every prompt; that SFT model is also the reference. Then any
preflab objective trains it on the 4 pairs, one full-batch step per epoch.

    preflab toy --out runs/toy                      # DPO and the regularizers, on- and off-policy starts

Deviations / readings (each a config field): "three-layer" = three Linear layers 4→64→64→10 (Assumption);
He-normal init with zero bias (with PyTorch's default init the prompts barely separate); ``unseen_avg`` =
``unseen_mass / 8`` (Assumption: the paper's "average unseen probability").
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from .losses import PairLogps, build_objective

PAIRS = ((0, 4), (1, 6), (2, 7), (3, 5))
SCENARIOS = {  # SFT row: responses 0-3, 4-7, 8, 9
    "both_on": (0.12, 0.12, 0.03, 0.01),
    "chosen_on_rejected_off": (0.12, 0.02, 0.40, 0.04),
    "chosen_off_rejected_on": (0.02, 0.12, 0.40, 0.04),
    "both_off": (0.02, 0.02, 0.80, 0.04),
}
VARIANTS = {  # objectives compared by `preflab toy`
    "dpo": [{"name": "sigmoid", "beta": 0.1}],
    "flex": [{"name": "flex", "beta_chosen": 0.1, "beta_rejected": 0.08}],
    "sft_dpo": [{"name": "sigmoid", "beta": 0.1}, {"name": "sft", "weight": 0.1}],
    "dpop": [{"name": "dpop", "beta": 0.1}],
}


@dataclass(frozen=True)
class ToyConfig:
    scenario: str = "both_on"
    loss: tuple = ({"name": "sigmoid", "beta": 0.1},)  # objective terms, as in a run config
    hidden: int = 64
    activation: str = "relu"  # relu | tanh
    init: str = "he_normal"  # he_normal | default (PyTorch's)
    sft_lr: float = 1e-2
    sft_steps: int = 3000
    sft_schedule: str = "cosine"  # cosine (decay to 0: Adam at 1e-2 otherwise ends on an oscillation) | constant
    sft_tolerance: float = 2e-3  # max-abs error the SFT start must reach
    lr: float = 2e-4
    epochs: int = 2000
    dtype: str = "float64"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ValueError(f"scenario: expected one of {sorted(SCENARIOS)}, got {self.scenario!r}")
        if self.activation not in ("relu", "tanh") or self.init not in ("he_normal", "default"):
            raise ValueError(f"activation/init: got {self.activation!r}/{self.init!r}")
        if self.sft_schedule not in ("cosine", "constant"):
            raise ValueError(f"sft_schedule: expected cosine or constant, got {self.sft_schedule!r}")


def sft_row(scenario: str) -> torch.Tensor:
    chosen, rejected, r8, r9 = SCENARIOS[scenario]
    return torch.tensor([chosen] * 4 + [rejected] * 4 + [r8, r9], dtype=torch.float64)


def make_mlp(cfg: ToyConfig) -> nn.Sequential:
    act = nn.ReLU if cfg.activation == "relu" else nn.Tanh
    mlp = nn.Sequential(nn.Linear(4, cfg.hidden), act(), nn.Linear(cfg.hidden, cfg.hidden), act(),
                        nn.Linear(cfg.hidden, 10))
    if cfg.init == "he_normal":
        for layer in mlp:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=math.sqrt(2.0 / layer.in_features))
                nn.init.zeros_(layer.bias)
    return mlp.to(getattr(torch, cfg.dtype))


def train_sft(mlp: nn.Module, cfg: ToyConfig) -> float:
    """Fit every prompt's output distribution to the scenario row; returns the max-abs error reached."""
    x = torch.eye(4, dtype=getattr(torch, cfg.dtype))
    target = sft_row(cfg.scenario).to(x.dtype).expand(4, 10)
    opt = torch.optim.Adam(mlp.parameters(), lr=cfg.sft_lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.sft_steps) if cfg.sft_schedule == "cosine" \
        else torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0)
    for _ in range(cfg.sft_steps):
        opt.zero_grad()
        loss = -(target * torch.log_softmax(mlp(x), -1)).sum(-1).mean()
        loss.backward()
        opt.step()
        schedule.step()
    with torch.no_grad():
        error = (torch.softmax(mlp(x), -1) - target).abs().max().item()
    if error > cfg.sft_tolerance:
        raise RuntimeError(f"toy SFT reached max-abs error {error:.2e} > {cfg.sft_tolerance:.0e}; raise sft_steps")
    return error


@dataclass
class ToyCurves:
    """Per-epoch curves, each a list of ``epochs + 1`` floats (epoch 0 is the SFT start)."""

    chosen_mean: list = field(default_factory=list)
    chosen_min: list = field(default_factory=list)
    rejected_mean: list = field(default_factory=list)
    rejected_max: list = field(default_factory=list)
    unseen_mass: list = field(default_factory=list)  # mean over prompts of 1 − π⁺ − π⁻
    unseen_avg: list = field(default_factory=list)  # unseen_mass / 8
    mass_8_9: list = field(default_factory=list)
    log10_grad_chosen: list = field(default_factory=list)  # mean over pairs of log10|∂ℓ/∂π⁺|
    log10_grad_rejected: list = field(default_factory=list)
    loss: list = field(default_factory=list)


def _pair(chosen: torch.Tensor, rejected: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor) -> PairLogps:
    """The 4 pairs' log-probs; every response is one token, so a pair's shared length is the whole of both."""
    ones = torch.ones(len(chosen), dtype=chosen.dtype)
    return PairLogps(chosen, rejected, ref_c, ref_r, ones, ones, chosen, rejected, ref_c, ref_r)


def _record(curves: ToyCurves, logp: torch.Tensor, objective, ref: torch.Tensor) -> torch.Tensor:
    """Append this epoch's statistics; returns the mean loss (with grad) over the 4 pairs."""
    idx = torch.arange(4)
    chosen_idx, rejected_idx = torch.tensor([c for c, _ in PAIRS]), torch.tensor([r for _, r in PAIRS])
    lc, lr = logp[idx, chosen_idx], logp[idx, rejected_idx]
    # gradients with respect to the log-probabilities, per pair, on detached leaves
    leaf_c, leaf_r = lc.detach().clone().requires_grad_(True), lr.detach().clone().requires_grad_(True)
    per_pair = objective(_pair(leaf_c, leaf_r, ref[idx, chosen_idx], ref[idx, rejected_idx])).losses
    g_c, g_r = torch.autograd.grad(per_pair.sum(), (leaf_c, leaf_r))
    ln10 = math.log(10.0)
    with torch.no_grad():
        p = logp.exp()
        pc, pr = p[idx, chosen_idx], p[idx, rejected_idx]
        unseen = 1 - pc - pr
        # |∂ℓ/∂π| = |∂ℓ/∂logπ| / π, in log10 without ever forming a tiny π
        curves.log10_grad_chosen.append(((g_c.abs().log() - lc) / ln10).mean().item())
        curves.log10_grad_rejected.append(((g_r.abs().log() - lr) / ln10).mean().item())
        for name, value in (("chosen_mean", pc.mean()), ("chosen_min", pc.min()), ("rejected_mean", pr.mean()),
                            ("rejected_max", pr.max()), ("unseen_mass", unseen.mean()),
                            ("unseen_avg", unseen.mean() / 8), ("mass_8_9", p[:, 8:].sum(-1).mean()),
                            ("loss", per_pair.mean())):
            getattr(curves, name).append(value.item())
    return objective(_pair(lc, lr, ref[idx, chosen_idx], ref[idx, rejected_idx])).losses.mean()


@functools.lru_cache(maxsize=64)
def _sft_start(cfg: ToyConfig) -> dict:
    """The SFT model's weights; depends only on the SFT fields, so variants of one seed share it."""
    torch.manual_seed(cfg.seed)
    mlp = make_mlp(cfg)
    train_sft(mlp, cfg)
    return {k: v.clone() for k, v in mlp.state_dict().items()}


def run_toy(cfg: ToyConfig) -> ToyCurves:
    """SFT to the scenario row, then train on the 4 pairs; returns the curves."""
    mlp = make_mlp(cfg)
    mlp.load_state_dict(_sft_start(replace(cfg, loss=(), lr=0.0, epochs=0)))
    x = torch.eye(4, dtype=getattr(torch, cfg.dtype))
    with torch.no_grad():
        ref = torch.log_softmax(mlp(x), -1)
    objective = build_objective([dict(t) for t in cfg.loss])
    opt = torch.optim.Adam(mlp.parameters(), lr=cfg.lr)
    curves = ToyCurves()
    for epoch in range(cfg.epochs + 1):
        loss = _record(curves, torch.log_softmax(mlp(x), -1), objective, ref)
        if epoch == cfg.epochs:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    return curves


def summary(curves: ToyCurves) -> dict:
    """The numbers the paper's claims are about (and that the spec's T5/T6 check)."""
    peak = max(curves.chosen_mean)
    return {
        "chosen_start": curves.chosen_mean[0], "chosen_peak": peak,
        "chosen_peak_epoch": curves.chosen_mean.index(peak), "chosen_final": curves.chosen_mean[-1],
        "rejected_final_max": curves.rejected_max[-1],
        "rejected_mean_at_500": curves.rejected_mean[min(500, len(curves.rejected_mean) - 1)],
        "unseen_mass_min": min(curves.unseen_mass), "unseen_mass_final": curves.unseen_mass[-1],
        "mass_8_9_final": curves.mass_8_9[-1],
        "log10_grad_gap_final": curves.log10_grad_rejected[-1] - curves.log10_grad_chosen[-1],
    }


def run_study(scenarios: list[str], variants: dict[str, list[dict]], seed: int = 0, epochs: int = 2000) -> dict:
    """Every variant on every scenario: ``{scenario: {variant: {"curves": ..., "summary": ...}}}``."""
    out: dict = {}
    for scenario in scenarios:
        for name, terms in variants.items():
            cfg = ToyConfig(scenario=scenario, loss=tuple(terms), seed=seed, epochs=epochs)
            curves = run_toy(cfg)
            out.setdefault(scenario, {})[name] = {"config": asdict(cfg), "summary": summary(curves),
                                                  "curves": asdict(curves)}
    return out


def plot_study(study: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("chosen_mean", "mean π(y⁺|x)", "linear"), ("rejected_mean", "mean π(y⁻|x)", "log"),
              ("unseen_mass", "unseen mass 1 − π⁺ − π⁻", "linear"),
              ("log10_grad_rejected", "log10|∂ℓ/∂π⁻| − log10|∂ℓ/∂π⁺|", "linear")]
    fig, axes = plt.subplots(len(study), len(panels), figsize=(4.2 * len(panels), 3.0 * len(study)), squeeze=False)
    for row, (scenario, variants) in enumerate(study.items()):
        for col, (key, title, scale) in enumerate(panels):
            ax = axes[row][col]
            for name, result in variants.items():
                c = result["curves"]
                ys = c[key] if key != "log10_grad_rejected" else [
                    a - b for a, b in zip(c["log10_grad_rejected"], c["log10_grad_chosen"])]
                ax.plot(ys, label=name, linewidth=1.2)
            ax.set_yscale(scale)
            ax.set_title(f"{scenario}: {title}", fontsize=9)
            ax.set_xlabel("epoch", fontsize=8)
            ax.tick_params(labelsize=7)
            if row == 0 and col == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
