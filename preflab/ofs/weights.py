"""Choosing COFS-DPO's combination weights w on the simplex (spec ../methods/ofs-cofs.md §2, "Choosing w").

``objective(w)`` scores a weight vector on the union of the replay buffers: lower is better for the DPO loss,
higher for preference accuracy. Up to ``grid_max_domains`` modules the simplex grid is searched; beyond, projected
gradient descent (Adam, a Euclidean projection after each step) on the differentiable DPO loss. Ties go to the
larger weight on the newest module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .combine import project_simplex, simplex_grid


@dataclass
class Choice:
    weights: tuple[float, ...]
    objective: float
    tried: list[dict] = field(default_factory=list)  # every candidate: {"weights", "objective"}


def _better(value: float, weights: tuple[float, ...], best: Choice | None, maximize: bool) -> bool:
    if best is None:
        return True
    if value != best.objective:
        return value > best.objective if maximize else value < best.objective
    return weights[-1] > best.weights[-1]  # tie: the newest module's larger weight


def grid_choice(objective: Callable[[tuple[float, ...]], float], d: int, step: float, maximize: bool = False) -> Choice:
    best: Choice | None = None
    tried = []
    for w in simplex_grid(d, step):
        value = float(objective(w))
        tried.append({"weights": list(w), "objective": value})
        if _better(value, w, best, maximize):
            best = Choice(w, value)
    best.tried = tried
    return best


def pgd_choice(loss_and_grad: Callable[[Tensor], float], d: int, steps: int, lr: float,
               maximize: bool = False, optimizer: str = "adam") -> Choice:
    """``loss_and_grad(w)`` accumulates ∂(DPO loss)/∂w into ``w.grad`` and returns the score the choice is made on
    (that loss, or an accuracy with ``maximize``). Starts uniform; every iterate, the start included, is a
    candidate. ``adam`` is the spec's reading; its per-coordinate normalisation makes coordinates with gradients
    of one sign move alike, which the projection then cancels, so it can stall on a face of the simplex short of
    the optimum (tests/ofs/test_mixture.py); ``sgd`` is plain projected gradient descent."""
    w = torch.full((d,), 1.0 / d, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([w], lr=lr) if optimizer == "adam" else torch.optim.SGD([w], lr=lr)
    best: Choice | None = None
    tried = []
    for i in range(steps + 1):
        opt.zero_grad()
        score = float(loss_and_grad(w))
        weights = tuple(w.detach().tolist())
        tried.append({"weights": list(weights), "objective": score})
        if _better(score, weights, best, maximize):
            best = Choice(weights, score)
        if i == steps:
            break
        opt.step()
        with torch.no_grad():
            w.copy_(project_simplex(w))
    best.tried = tried
    return best
