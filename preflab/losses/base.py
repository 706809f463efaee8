"""What every objective shares: its inputs, its output, its hyperparameter base class and the registry.

An objective is a pure function ``(PairLogps, hp) -> LossOutput``. It knows nothing of models,
tokenizers or configs. New objective = one module that calls :func:`register_loss`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor

NORMALIZE_CHOICES = ("sum", "mean")


@dataclass(frozen=True)
class PairLogps:
    """Per-sequence log-probs of a batch of pairs, all shaped ``(B,)``.

    ``*_tokens`` are response token counts (float). Reference log-probs may be ``None`` for
    reference-free objectives. ``*_shared`` are the log-probs of each response's first ``min(|y⁺|, |y⁻|)`` tokens
    (the pair's shared length), where the scorer gave them: what LD-DPO (:meth:`length_desensitized`) reads.
    """

    policy_chosen: Tensor
    policy_rejected: Tensor
    ref_chosen: Tensor | None
    ref_rejected: Tensor | None
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    policy_chosen_shared: Tensor | None = None
    policy_rejected_shared: Tensor | None = None
    ref_chosen_shared: Tensor | None = None
    ref_rejected_shared: Tensor | None = None

    @classmethod
    def of_batch(cls, num_pairs: int, policy: tuple[Tensor, Tensor, Tensor | None],
                 ref: tuple[Tensor, Tensor | None] | None = None) -> PairLogps:
        """From ``(2B,)`` per-sequence tensors, chosen ``[0, B)`` then rejected ``[B, 2B)``: the policy's
        ``(logps, counts, shared)`` (a scorer's :class:`~preflab.models.scorer.Scores`) and the reference's
        ``(logps, shared)`` (None for a reference-free objective)."""
        def halves(t: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
            return (None, None) if t is None else (t[:num_pairs], t[num_pairs:])
        (logps, counts, shared), (ref_logps, ref_shared) = policy, ref or (None, None)
        return cls(*halves(logps), *halves(ref_logps), *halves(counts), *halves(shared), *halves(ref_shared))

    def length_desensitized(self, alpha: float) -> PairLogps:
        """LD-DPO (Liu et al., *Length Desensitization in Direct Preference Optimization*, arXiv 2409.06411): every
        log-prob, policy's and reference's, as ``logp_shared + α·(logp − logp_shared)``: the part beyond the pair's
        shared length weighted by α (1 = unchanged, 0 = the shared length only); token counts unchanged. TRL's
        ``ld_alpha``."""
        if self.policy_chosen_shared is None or self.policy_rejected_shared is None:
            raise ValueError("ld_alpha needs the log-probs of the pairs' shared length, which this scorer did not give")
        if self.ref_chosen is not None and self.ref_chosen_shared is None:
            raise ValueError("ld_alpha needs the reference's log-probs of the pairs' shared length, not given here")

        def weighted(total: Tensor | None, shared: Tensor | None) -> Tensor | None:
            return None if total is None else shared + alpha * (total - shared)
        return PairLogps(weighted(self.policy_chosen, self.policy_chosen_shared),
                         weighted(self.policy_rejected, self.policy_rejected_shared),
                         weighted(self.ref_chosen, self.ref_chosen_shared),
                         weighted(self.ref_rejected, self.ref_rejected_shared),
                         self.chosen_tokens, self.rejected_tokens)

    def policy(self, normalize: str) -> tuple[Tensor, Tensor]:
        if normalize == "mean":
            return self.policy_chosen / self.chosen_tokens, self.policy_rejected / self.rejected_tokens
        return self.policy_chosen, self.policy_rejected

    def reference(self, normalize: str) -> tuple[Tensor, Tensor]:
        """The reference's log-probs of chosen and rejected, per token if ``normalize='mean'``."""
        if self.ref_chosen is None or self.ref_rejected is None:
            raise ValueError("this objective needs reference log-probs, but none were given")
        ref = PairLogps(self.ref_chosen, self.ref_rejected, None, None, self.chosen_tokens, self.rejected_tokens)
        return ref.policy(normalize)

    def logratios(self, normalize: str) -> tuple[Tensor, Tensor]:
        """``ρ⁺ = logp_θ(y⁺) − logp_ref(y⁺)`` and ``ρ⁻``, shape ``(B,)``, per token if ``normalize='mean'``."""
        (rc, rr), (pc, pr) = self.reference(normalize), self.policy(normalize)
        return pc - rc, pr - rr


@dataclass(frozen=True)
class LossOutput:
    """Unreduced per-pair losses ``(B,)`` and detached implicit rewards / margin ``(B,)``.

    ``chosen_rewards``/``rejected_rewards``/``margin`` are ``None`` for terms that define no implicit
    reward (the SFT term). ``margin`` is the log-ratio margin ``h = ρ⁺ − ρ⁻`` the objective used.
    ``reward_margin`` is the implicit-reward margin ``r⁺ − r⁻`` with its gradient (``β·h``, or
    ``β⁺ρ⁺ − β⁻ρ⁻`` for Flex-DPO): what a schedule that needs the objective's margin reads (OFS's chasing term),
    in the objective's own β and ``logp_normalize``. ``metrics`` are the objective's own, per pair (BCO's ``delta``).
    """

    losses: Tensor
    chosen_rewards: Tensor | None = None
    rejected_rewards: Tensor | None = None
    margin: Tensor | None = None
    reward_margin: Tensor | None = None
    metrics: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class LossHParams:
    """Base of every objective's hyperparameters. ``weight`` is its factor in a weighted sum."""

    weight: float = 1.0
    logp_normalize: str = "sum"
    ld_alpha: float | None = None  # LD-DPO's α on the log-probs beyond the pair's shared length; None: off

    def __post_init__(self) -> None:
        self._require_choice("logp_normalize", NORMALIZE_CHOICES)
        if self.ld_alpha is not None and not 0.0 <= self.ld_alpha <= 1.0:
            raise ValueError(f"ld_alpha: must be in [0, 1] (or null for off), got {self.ld_alpha!r}")

    def kl_strength(self) -> float | None:
        """The objective's β (the KL strength of its implicit reward), None when it has none."""
        return getattr(self, "beta", None)

    def with_beta(self, beta: float) -> LossHParams | None:
        """These hyperparameters with β set to ``beta`` (a schedule's β, e.g. APO's per-iteration value); None when
        the objective has no β."""
        if "beta" not in {f.name for f in fields(self)}:
            return None
        return replace(self, beta=beta)

    @property
    def tracks(self) -> bool:
        """Whether this term reads a running mean over training steps (of :meth:`tracked`'s values)."""
        return False

    def tracked(self, logps: PairLogps) -> Tensor:
        """The values of a training step that enter the running mean (:meth:`Objective.observe`)."""
        raise NotImplementedError

    def with_tracked_mean(self, mean: float) -> LossHParams:
        """These hyperparameters with the running mean filled in (what the term's function reads)."""
        raise NotImplementedError

    def _require_choice(self, name: str, choices: tuple[str, ...]) -> None:
        if getattr(self, name) not in choices:
            raise ValueError(f"{name}: expected one of {choices}, got {getattr(self, name)!r}")

    def _require_label_smoothing(self) -> None:
        """ε, a label-flip probability, in [0, 0.5)."""
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing: must be in [0, 0.5), got {self.label_smoothing!r}")

    def _require_non_negative(self, *names: str) -> None:
        for name in names:
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)!r}")

    def _require_positive(self, *names: str) -> None:
        for name in names:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class BetaHParams(LossHParams):
    """An objective whose only setting is β."""

    beta: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        self._require_positive("beta")


def smoothed_logistic(z: Tensor, label_smoothing: float) -> Tensor:
    """cDPO's ``−(1−ε)·log σ(z) − ε·log σ(−z)``; ε = 0 is the logistic loss ``−log σ(z)``."""
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def dpo_rewards(rho_c: Tensor, rho_r: Tensor, beta_c: float, beta_r: float | None = None) -> dict:
    """The implicit rewards ``r± = β·ρ±`` and the margin ``h``, detached, and the reward margin ``r⁺ − r⁻`` with
    its gradient, as ``LossOutput`` fields."""
    reward_margin = beta_c * (rho_c - rho_r) if beta_r is None else beta_c * rho_c - beta_r * rho_r
    beta_r = beta_c if beta_r is None else beta_r
    return {
        "chosen_rewards": (beta_c * rho_c).detach(),
        "rejected_rewards": (beta_r * rho_r).detach(),
        "margin": (rho_c - rho_r).detach(),
        "reward_margin": reward_margin,
    }


@dataclass(frozen=True)
class LossSpec:
    name: str
    fn: Callable[[PairLogps, LossHParams], LossOutput]
    hparams: type[LossHParams]
    reference_free: bool = False


_REGISTRY: dict[str, LossSpec] = {}


def register_loss(name: str, fn: Callable[[PairLogps, LossHParams], LossOutput], hparams: type[LossHParams],
                  reference_free: bool = False) -> None:
    """Make ``fn`` available as objective ``name`` with hyperparameter class ``hparams`` (one call after the function,
    not a decorator: a decorated function is out of reach of the mutation tests, see tools/mutation.sh)."""
    if name in _REGISTRY:
        raise ValueError(f"loss {name!r} registered twice")
    _REGISTRY[name] = LossSpec(name, fn, hparams, reference_free)


def loss_registry() -> dict[str, LossSpec]:
    return dict(_REGISTRY)


def term_input(logps: PairLogps, hp: LossHParams) -> PairLogps:
    """The log-probs a term reads: length-desensitized where it sets ``ld_alpha``."""
    return logps if hp.ld_alpha is None else logps.length_desensitized(hp.ld_alpha)


@dataclass(frozen=True)
class Objective:
    """A weighted sum of registered objectives: ``Σ_i w_i · loss_i``; the first term with implicit rewards
    provides the reported rewards and margin.

    ``state`` holds, per term that tracks a running mean (BCO's reward shift δ), ``{"mean", "count"}``: changed only
    by :meth:`observe`, which a training step calls once with every policy's log-probs of the step, read by every
    call. A run keeps it in its checkpointed state; evaluation and the other calls only read it.
    """

    terms: tuple[tuple[LossSpec, LossHParams], ...]
    state: dict = field(default_factory=dict, compare=False)

    @property
    def reference_free(self) -> bool:
        return all(spec.reference_free for spec, _ in self.terms)

    def kl_strength(self) -> float | None:
        """β of the first term that has one (the term whose rewards are reported), else None."""
        return next((hp.kl_strength() for _, hp in self.terms if hp.kl_strength() is not None), None)

    def with_beta(self, beta: float) -> Objective:
        """Every term that has a β takes ``beta`` (:meth:`LossHParams.with_beta`), the others are kept; a ValueError
        when no term has one (a schedule's β would act on nothing)."""
        terms = tuple((spec, hp.with_beta(beta) or hp) for spec, hp in self.terms)
        if all(hp.with_beta(beta) is None for _, hp in self.terms):
            raise ValueError(f"no term of the objective ({', '.join(spec.name for spec, _ in self.terms)}) has a beta")
        return Objective(terms, self.state)  # the same running means

    def observe(self, steps: list[PairLogps], reduce: Callable[[dict], dict] | None = None) -> None:
        """Adds the tracked values of a training step's log-probs (one per policy the step trains: two under OFS) to
        each tracking term's running mean; ``reduce`` sums ``{"sum", "count"}`` over the processes. A step whose
        values are not finite (anywhere) leaves the means as they are."""
        for i, (_, hp) in enumerate(self.terms):
            if not hp.tracks:
                continue
            values = torch.cat([hp.tracked(term_input(logps, hp)) for logps in steps]).detach().double()
            local = {"sum": values.sum().item(), "count": float(values.numel())}
            total = reduce(local) if reduce is not None else local
            if not math.isfinite(total["sum"]) or total["count"] == 0:
                continue
            prev = self._tracked(i)
            count = prev["count"] + total["count"]
            mean = prev["mean"] + (total["sum"] / total["count"] - prev["mean"]) * total["count"] / count
            self.state[str(i)] = {"mean": mean, "count": count}

    def _tracked(self, i: int) -> dict:
        return self.state.get(str(i), {"mean": 0.0, "count": 0.0})  # before the first observed step

    def tracked_mean(self, i: int) -> float:
        """Term ``i``'s running mean, 0 before the first observed step."""
        return self._tracked(i)["mean"]

    def load_state(self, state: dict) -> None:
        """Restores the running means of a checkpoint (in place: the run's state holds this very dict)."""
        self.state.clear()
        self.state.update(state)

    def __call__(self, logps: PairLogps) -> LossOutput:
        total = None
        rewards = {}
        metrics = {}
        for i, (spec, hp) in enumerate(self.terms):
            if hp.tracks:  # its running mean, logged per pair under TRL's name (then delta/<term>)
                hp = hp.with_tracked_mean(self.tracked_mean(i))
                metrics[f"delta/{i}" if metrics else "delta"] = torch.full_like(logps.policy_chosen,
                                                                               self.tracked_mean(i))
            out = spec.fn(term_input(logps, hp), hp)
            weighted = hp.weight * out.losses
            total = weighted if total is None else total + weighted
            if not rewards and out.margin is not None:
                rewards = {"chosen_rewards": out.chosen_rewards, "rejected_rewards": out.rejected_rewards,
                           "margin": out.margin, "reward_margin": out.reward_margin}
        if not rewards:  # reference-free only: report the policy's own log-prob margin
            rewards = {"margin": (logps.policy_chosen - logps.policy_rejected).detach()}
        return LossOutput(total, metrics=metrics, **rewards)

