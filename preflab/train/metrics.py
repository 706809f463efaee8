"""Metrics, computed once from an objective's output, and the writer of ``metrics.jsonl``.

Names and definitions follow TRL's DPOTrainer: ``loss``, ``rewards/chosen`` (mean β·ρ⁺),
``rewards/rejected``, ``rewards/margins`` (mean r⁺ − r⁻), ``rewards/accuracies`` (fraction with margin
h > 0), ``logps/chosen``, ``logps/rejected`` (mean summed log-prob of the policy). preflab adds the β-free
log-ratios under ``3d/``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from ..losses import LossOutput, PairLogps


def pair_metrics(logps: PairLogps, out: LossOutput) -> dict[str, Tensor]:
    """Per-pair metric values, each ``(B,)`` and detached; average them over pairs to report."""
    m = {
        "loss": out.losses.detach(),
        "rewards/accuracies": (out.margin > 0).float(),
        "logps/chosen": logps.policy_chosen.detach(),
        "logps/rejected": logps.policy_rejected.detach(),
    }
    if out.chosen_rewards is not None:
        m["rewards/chosen"] = out.chosen_rewards
        m["rewards/rejected"] = out.rejected_rewards
        m["rewards/margins"] = out.chosen_rewards - out.rejected_rewards
    # log(|∂ℓ/∂π⁻| / |∂ℓ/∂π⁺|) for sigmoid DPO (3D-properties): sequence sums, never exponentiated
    m["3d/log_grad_ratio"] = (logps.policy_chosen - logps.policy_rejected).detach()
    if logps.ref_chosen is not None:
        rho_c, rho_r = logps.policy_chosen - logps.ref_chosen, logps.policy_rejected - logps.ref_rejected
        m["3d/chosen_down_frac"] = (rho_c < 0).float().detach()
        m["3d/logratio_chosen"] = rho_c.detach()
        m["3d/logratio_rejected"] = rho_r.detach()
        m["3d/logratio_chosen_per_token"] = (rho_c / logps.chosen_tokens).detach()
        m["3d/logratio_rejected_per_token"] = (rho_r / logps.rejected_tokens).detach()
    m.update(out.metrics)  # the objective's own (BCO's running reward shift, "delta")
    return m


class MetricAccumulator:
    """Collects per-pair metric tensors over micro-batches and averages them over all pairs."""

    def __init__(self) -> None:
        self._parts: dict[str, list[Tensor]] = {}

    def add(self, metrics: dict[str, Tensor]) -> None:
        for k, v in metrics.items():
            self._parts.setdefault(k, []).append(v.detach().float().reshape(-1).cpu())

    def mean(self) -> dict[str, float]:
        out = {k: torch.cat(v).mean().item() for k, v in self._parts.items()}
        self._parts.clear()
        return out


class MetricsWriter:
    """Appends one JSON object per logging step to ``metrics.jsonl`` (flushed each time)."""

    def __init__(self, path: Path, resume_step: int = 0):
        self.path = Path(path)
        if self.path.exists():  # drop records past the checkpoint we resume from: no duplicate steps
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and _step_of(line) is not None and _step_of(line) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None
