"""What every objective shares: its inputs, its output, its hyperparameter base class and the registry.

An objective is a pure function ``(PairLogps, hp) -> LossOutput``. It knows nothing of models,
tokenizers or configs. New objective = one module that calls :func:`register_loss`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch.nn.functional as F
from torch import Tensor

NORMALIZE_CHOICES = ("sum", "mean")


@dataclass(frozen=True)
class PairLogps:
    """Per-sequence log-probs of a batch of pairs, all shaped ``(B,)``.

    ``*_tokens`` are response token counts (float). Reference log-probs may be ``None`` for
    reference-free objectives.
    """

    policy_chosen: Tensor
    policy_rejected: Tensor
    ref_chosen: Tensor | None
    ref_rejected: Tensor | None
    chosen_tokens: Tensor
    rejected_tokens: Tensor

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
    in the objective's own β and ``logp_normalize``.
    """

    losses: Tensor
    chosen_rewards: Tensor | None = None
    rejected_rewards: Tensor | None = None
    margin: Tensor | None = None
    reward_margin: Tensor | None = None


@dataclass(frozen=True)
class LossHParams:
    """Base of every objective's hyperparameters. ``weight`` is its factor in a weighted sum."""

    weight: float = 1.0
    logp_normalize: str = "sum"

    def __post_init__(self) -> None:
        self._require_choice("logp_normalize", NORMALIZE_CHOICES)

    def kl_strength(self) -> float | None:
        """The objective's β (the KL strength of its implicit reward), None when it has none."""
        return getattr(self, "beta", None)

    def with_beta(self, beta: float) -> LossHParams | None:
        """These hyperparameters with β set to ``beta`` (a schedule's β, e.g. APO's per-iteration value); None when
        the objective has no β."""
        if "beta" not in {f.name for f in fields(self)}:
            return None
        return replace(self, beta=beta)

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


@dataclass(frozen=True)
class Objective:
    """A weighted sum of registered objectives: ``Σ_i w_i · loss_i``; the first term with implicit rewards
    provides the reported rewards and margin."""

    terms: tuple[tuple[LossSpec, LossHParams], ...]

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
        return Objective(terms)

    def __call__(self, logps: PairLogps) -> LossOutput:
        total = None
        rewards = {}
        for spec, hp in self.terms:
            out = spec.fn(logps, hp)
            weighted = hp.weight * out.losses
            total = weighted if total is None else total + weighted
            if not rewards and out.margin is not None:
                rewards = {"chosen_rewards": out.chosen_rewards, "rejected_rewards": out.rejected_rewards,
                           "margin": out.margin, "reward_margin": out.reward_margin}
        if not rewards:  # reference-free only: report the policy's own log-prob margin
            rewards = {"margin": (logps.policy_chosen - logps.policy_rejected).detach()}
        return LossOutput(total, **rewards)

