"""Online merging optimizers: every AdamW step is merged with the SFT task vector (Lu et al., arXiv 2405.17931).

``OnDAREAdamW`` and ``OnTIESAdamW`` are plain ``torch.optim.Optimizer`` subclasses: any trainer can use them.
Adam's moments always see the full gradient; the merge acts on Adam's step δ and on the task vector
τ = θ_SFT − θ_base of each tensor, element-wise within that tensor (no global top-k):

- OnDARE: τ̃ = clamp(M₀ ⊙ τ / p, ±c) with a Bernoulli(p) mask M₀ drawn once; every step
  θ ← θ + α·τ̃ + (1 − α)·(M_t ⊙ δ)/p with a fresh mask M_t.
- OnTIES: τ̃ = τ ⊙ top-k(|τ|), k = ⌊p·numel⌋; every step δ̃ = δ ⊙ top-k(|δ|), the sign s of τ̃ + δ̃ is
  elected per coordinate, and θ ← θ + α·τ̃·[sign τ̃ = s] + (1 − α)·δ̃·[sign δ̃ = s].

The rules follow the public reference code (QwenLM/online_merging_optimizers) where it differs from the
paper; every such choice is an option (see ``MergingOptions``). Tensors without a task vector (e.g.
adapter factors) take the plain AdamW step. With ``online_step = K > 1`` the merge happens every K-th
step of a tensor on the steps accumulated since the last merge (the paper's Algorithm 2).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..models.shards import is_sharded, shard_like


@dataclass(frozen=True)
class MergingOptions:
    reserve_p: float = 0.01  # p: the kept fraction (DARE) or top-k share (TIES)
    alpha: float = 1e-7  # weight of the task vector in the merge
    merge: bool = True  # false: OnDARE is pure step dropout; OnTIES still elects δ̃ against τ̃
    clip: float = 1.0  # OnDARE: τ̃ clamped to ±clip (the reference's cap)
    # OnDARE: inverse_p (default: 1/p on τ̃ and the kept step, as dropout scales), none (the paper's Eq. 4: no
    # rescale), l1 (1/p, then the kept step scaled to the L1 norm of the whole step and clamped to ±clip: the
    # reference's rescale flag). OnTIES: none (default) or l1 (trimmed τ̃ and δ̃ each scaled back to the L1 norm of
    # the untrimmed tensor, the reference's flag); top-k keeps no random share, so inverse_p is refused there.
    # null: the optimizer's default.
    rescale: str | None = field(default=None, metadata={"choices": (None, "inverse_p", "none", "l1")})
    ties_election: str = field(default="unweighted", metadata={"choices": ("unweighted", "weighted")})
    online_step: int = 1  # K: merge every K-th step of a tensor
    alpha_schedule: str = field(default="constant", metadata={"choices": ("constant", "lr_ratio")})
    adam_formulation: str = field(default="reference", metadata={"choices": ("reference", "torch")})
    allow_low_precision_master: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.reserve_p <= 1:
            raise ValueError(f"reserve_p: must be in (0, 1], got {self.reserve_p}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha: must be in [0, 1], got {self.alpha}")
        if self.online_step < 1:
            raise ValueError(f"online_step: must be >= 1, got {self.online_step}")
        if self.clip <= 0:
            raise ValueError(f"clip: must be > 0, got {self.clip}")


def topk_mask(values: Tensor, p: float) -> Tensor:
    """Boolean mask of the ⌊p·numel⌋ largest ``|values|`` (all True when p ≥ 1 or k < 1: no trimming)."""
    k = math.floor(p * values.numel())
    if p >= 1 or k < 1:
        return torch.ones_like(values, dtype=torch.bool)
    flat = values.abs().flatten()
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()  # kthvalue needs a full-precision type; compare in the same one
    threshold = torch.kthvalue(flat, flat.numel() - k + 1).values  # the k-th largest
    mask = flat >= threshold
    if int(mask.sum()) > k:  # ties at the threshold: keep exactly k, arbitrarily but deterministically
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[torch.topk(flat, k).indices] = True
    return mask.view_as(values)


def ties_merge(tau: Tensor, delta: Tensor, alpha: float, election: str = "unweighted", merge: bool = True) -> Tensor:
    """The OnTIES update of already-trimmed ``tau`` (τ̃) and ``delta`` (δ̃)."""
    if election not in ("unweighted", "weighted"):
        raise ValueError(f"ties_election: expected unweighted or weighted, got {election!r}")
    if election == "weighted" and merge:  # the paper's Eq. 7: agreeing signs add, else the larger one wins
        a, b = (1 - alpha) * delta, alpha * tau
        agree = torch.sign(a) * torch.sign(b) >= 0
        return torch.where(agree, a + b, torch.where(a.abs() >= b.abs(), a, b))
    sign = torch.where(tau + delta >= 0, 1.0, -1.0)  # elected on the unweighted sum
    kept_delta = delta * (torch.sign(delta) == sign)
    if not merge:
        return kept_delta
    return alpha * tau * (torch.sign(tau) == sign) + (1 - alpha) * kept_delta


class _MergingAdamW(torch.optim.Optimizer):
    """AdamW whose step goes through :meth:`_merge`; the subclasses define the task-vector preparation and merge."""

    default_rescale = "none"  # options.rescale null: this
    rescale_choices: tuple[str, ...] = ("none",)
    _rescale_refusal = ""  # why a value outside rescale_choices is refused

    def __init__(self, params, task_vectors: Mapping[Tensor, Tensor] | None = None, lr: float = 1e-6,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 options: MergingOptions | None = None, **option_overrides):
        options = options or MergingOptions()
        if option_overrides:
            options = MergingOptions(**{**options.__dict__, **option_overrides})
        self.options = options
        self.rescale = options.rescale or self.default_rescale
        if self.rescale not in self.rescale_choices:
            raise ValueError(f"rescale: {type(self).__name__} takes one of {list(self.rescale_choices)}, got "
                             f"{self.rescale!r}{self._rescale_refusal}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        params_seen = [p for g in self.param_groups for p in g["params"]]
        device = params_seen[0].device if params_seen else torch.device("cpu")
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(options.seed)
        known = {id(p) for p in params_seen}
        for param, tau in (task_vectors or {}).items():
            if id(param) not in known:
                raise ValueError("task_vectors: a tensor with a task vector is not among the optimized parameters")
            self.set_task_vector(param, tau)

    # -- task vectors ---------------------------------------------------------------------------------------

    def set_task_vector(self, param: Tensor, tau: Tensor, name: str = "a parameter") -> None:
        """Prepares τ̃ for ``param`` (held in the optimizer state in the parameter's dtype)."""
        if tau.shape != param.shape:
            raise ValueError(f"task vector of {name}: shape {tuple(tau.shape)} != parameter {tuple(param.shape)}")
        if param.dtype != torch.float32 and param.dtype != torch.float64 \
                and not self.options.allow_low_precision_master:
            raise ValueError(f"{name} is {param.dtype}: online merging needs fp32 master weights (its increments "
                             f"are ~1e-7 of a weight); set optim.allow_low_precision_master=true to force it")
        self.state[param]["tau"] = self._prepare_tau(tau.detach().to(param.device, param.dtype))

    def task_vector_bytes(self) -> int:
        return sum(s["tau"].numel() * s["tau"].element_size() for s in self.state.values() if "tau" in s)

    def _draw_mask(self, like: Tensor, p: float) -> Tensor:
        """Bernoulli(p) keep-mask (the test hook: patch this to inject masks)."""
        return torch.rand(like.shape, generator=self.generator, device=self.generator.device).to(like.device) < p

    def _prepare_tau(self, tau: Tensor) -> Tensor:
        raise NotImplementedError

    def _merge(self, tau: Tensor, delta: Tensor, alpha: float, eps: float) -> Tensor:
        raise NotImplementedError

    # -- the step -------------------------------------------------------------------------------------------

    def _adam_delta(self, param: Tensor, grad: Tensor, state: dict, group: dict) -> Tensor:
        beta1, beta2 = group["betas"]
        if "exp_avg" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(param)
            state["exp_avg_sq"] = torch.zeros_like(param)
        state["step"] += 1
        t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
        m.mul_(beta1).add_(grad, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        lr, eps = group["lr"], group["eps"]
        if self.options.adam_formulation == "torch":  # torch.optim.AdamW: ε on the bias-corrected √v̂
            denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
            return -(lr / (1 - beta1 ** t)) * m / denom
        return -(lr * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)) * m / (v.sqrt() + eps)

    def _alpha(self, group: dict) -> float:
        if self.options.alpha_schedule == "lr_ratio":
            return self.options.alpha * group["lr"] / group.get("initial_lr", group["lr"])
        return self.options.alpha

    def step(self, closure=None):
        loss = None
        if closure is not None:
            loss = closure()
        with torch.no_grad():  # (not a decorator: decorated methods escape the mutation tests)
            self._step()
        return loss

    def _step(self) -> None:
        k = self.options.online_step
        for group in self.param_groups:
            decay = group["lr"] * group["weight_decay"]
            torch_rule = self.options.adam_formulation == "torch"
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if torch_rule and decay:
                    param.mul_(1 - decay)
                delta = self._adam_delta(param, param.grad, state, group)
                if "tau" not in state:
                    param.add_(delta)
                elif state["step"] % k:  # step-K, between merges: the plain step, remembered (Algorithm 2)
                    param.add_(delta)
                    state.setdefault("delta_cache", torch.zeros_like(param)).add_(delta)
                else:
                    if k > 1:  # a merge: the remembered steps are rolled back and merged with this one
                        cache = state["delta_cache"]  # (steps 1..K−1 made it)
                        param.sub_(cache)
                        delta = delta + cache
                        cache.zero_()
                    param.add_(self._merged(param, state["tau"], delta, group))
                if not torch_rule and decay:
                    param.mul_(1 - decay)

    def _merged(self, param: Tensor, tau: Tensor, delta: Tensor, group: dict) -> Tensor:
        """The merged update of ``param``. A shard (an FSDP ``DTensor``) is merged as the whole tensor: τ̃ and δ are
        gathered (a collective: every process merges every tensor, in the same order), the masks and top-k are
        those of one process (every process draws from the same generator) and this process keeps its shard."""
        alpha, eps = self._alpha(group), group["eps"]
        if not is_sharded(param):
            return self._merge(tau, delta, alpha, eps)
        return shard_like(self._merge(tau.full_tensor(), delta.full_tensor(), alpha, eps), param)

    # -- state: the mask generator travels with the optimizer state ------------------------------------------

    def state_dict(self) -> dict:
        out = super().state_dict()
        out["merging_generator"] = self.generator.get_state()
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        generator = state_dict.pop("merging_generator", None)
        super().load_state_dict(state_dict)
        if generator is not None:
            self.generator.set_state(generator.cpu())


L1_FLOOR = 1e-8  # the reference skips the L1 rescale of a tensor whose L1 norm is below this


class OnDAREAdamW(_MergingAdamW):
    """AdamW merged every step with a once-dropped, rescaled SFT task vector (random drop and rescale)."""

    default_rescale, rescale_choices = "inverse_p", ("inverse_p", "none", "l1")
    _rescale_refusal = ""

    def _prepare_tau(self, tau: Tensor) -> Tensor:
        # τ̃ = clamp(M₀ ⊙ τ / p, ±c): the 1/p factor and the clamp alone (no L1 rescale of τ̃, as in the reference);
        # rescale none is the paper's Eq. 4 (no 1/p)
        p, c = self.options.reserve_p, self.options.clip
        kept = tau * self._draw_mask(tau, p)
        return (kept if self.rescale == "none" else kept / p).clamp(-c, c)

    def _merge(self, tau: Tensor, delta: Tensor, alpha: float, eps: float) -> Tensor:
        p = self.options.reserve_p
        dropped = delta * self._draw_mask(delta, p)
        if self.rescale != "none":
            dropped = dropped / p
        if self.rescale == "l1":  # the reference: ‖δ‖₁/(‖M⊙δ/p‖₁ + ε) with Adam's ε, then the clamp
            full = delta.abs().sum()
            if full >= L1_FLOOR:
                c = self.options.clip
                dropped = (dropped * (full / (dropped.abs().sum() + eps))).clamp(-c, c)
        if not self.options.merge:
            return dropped
        return alpha * tau + (1 - alpha) * dropped


class OnTIESAdamW(_MergingAdamW):
    """AdamW merged every step with the top-k SFT task vector by TIES sign election."""

    default_rescale, rescale_choices = "none", ("none", "l1")
    _rescale_refusal = " (top-k trimming keeps no random share to scale by 1/p)"

    def _trim(self, values: Tensor) -> Tensor:
        """``values`` ⊙ top-k(|values|); with ``rescale: l1`` scaled back to the untrimmed L1 norm (the reference's
        ``magnitude_mask_``: only when trimming happens and ‖values‖₁ ≥ 1e-8)."""
        p = self.options.reserve_p
        mask = topk_mask(values, p)
        trimmed = values * mask
        if self.rescale == "l1":  # (without trimming the factor is exactly 1)
            full = values.abs().sum()
            if full >= L1_FLOOR:
                trimmed = trimmed * (full / trimmed.abs().sum())
        return trimmed

    def _prepare_tau(self, tau: Tensor) -> Tensor:
        return self._trim(tau)

    def _merge(self, tau: Tensor, delta: Tensor, alpha: float, eps: float) -> Tensor:
        return ties_merge(tau, self._trim(delta), alpha, self.options.ties_election, self.options.merge)


def task_vectors_by_name(named_params: Iterable[tuple[str, Tensor]], base: Mapping[str, Tensor],
                         sft: Mapping[str, Tensor]) -> dict[Tensor, Tensor]:
    """τ = θ_SFT − θ_base for every trainable tensor whose name (wrapper prefixes stripped) both models hold."""
    out = {}
    for name, param in named_params:
        if not param.requires_grad:
            continue
        key = match_name(name, sft)
        if key is None:
            continue
        if key not in base:
            raise ValueError(f"task vector: {key} is in the SFT model but not in the base model")
        if base[key].shape != sft[key].shape or sft[key].shape != param.shape:
            raise ValueError(f"task vector: {key} has shapes base {tuple(base[key].shape)}, "
                             f"sft {tuple(sft[key].shape)}, policy {tuple(param.shape)}")
        out[param] = sft[key].float() - base[key].float()
    return out


def match_name(name: str, table: Mapping[str, Tensor]) -> str | None:
    """``name`` or a suffix of it after stripping wrapper prefixes (``module.``, ``base_model.model.``, ...)."""
    parts = name.split(".")
    for i in range(len(parts)):
        candidate = ".".join(parts[i:])
        if candidate in table:
            return candidate
    return None
