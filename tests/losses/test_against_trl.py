"""Each objective against TRL's own implementation on the same log-prob tensors (fp64); skipped without TRL (the
optional extra ``preflab[trl]``).

TRL 1.16 computes its DPO losses inline in ``DPOTrainer._compute_loss``; the test runs that very source (the
block from the f-divergence scores to the end of the loss branch, read with ``inspect``) on preflab's tensors.
SimPO, CPO and ORPO are ``CPOTrainer.cpo_loss`` and ``ORPOTrainer.odds_ratio_loss``, called unbound.
"""

import inspect
import math
import textwrap
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from preflab.losses import PairLogps, build_objective

trl = pytest.importorskip("trl")
F64 = torch.float64


def _logps(n=16, seed=0, equal_lengths=False) -> PairLogps:
    g = torch.Generator().manual_seed(seed)
    counts = lambda: (torch.full((n,), 6.0, dtype=F64) if equal_lengths
                      else torch.randint(2, 30, (n,), generator=g).to(F64))
    c_n, r_n = counts(), counts()
    draw = lambda k: -torch.rand(n, generator=g, dtype=F64) * 2.5 * k  # log-probs of about −1.25 per token
    return PairLogps(draw(c_n), draw(r_n), draw(c_n), draw(r_n), c_n, r_n)


def _float32(logps: PairLogps) -> PairLogps:
    return PairLogps(*(None if t is None else t.float() for t in vars(logps).values()))


def _trl_dpo_losses(logps: PairLogps, loss_type: str, **settings) -> torch.Tensor:
    """TRL's per-sequence loss for ``loss_type``: its ``_compute_loss`` source from the f-divergence scores to the
    end of the loss branch, executed on these tensors."""
    from trl import DPOTrainer

    source = inspect.getsource(DPOTrainer._compute_loss)
    start = source.index('        if self.f_divergence_type == "reverse_kl":')
    end = source.index("            if self.use_weighting:")
    block = textwrap.dedent(source[start:end]) + "    out[loss_type] = per_sequence_loss\n"
    n = len(logps.policy_chosen)
    lengths = torch.cat([logps.chosen_tokens, logps.rejected_tokens]).long()
    mask = (torch.arange(int(lengths.max()))[None, :] < lengths[:, None]).long()  # (2B, L), chosen rows first
    # per-token log-probs (for TRL's sft): each sequence's log-prob spread evenly over its tokens
    per_token = torch.cat([logps.policy_chosen, logps.policy_rejected])[:, None] / lengths[:, None] * mask
    settings = {"beta": 0.1, "label_smoothing": 0.0, "f_divergence_type": "reverse_kl",
                "f_alpha_divergence_coef": 0.5, **settings}
    trainer = SimpleNamespace(loss_types=[loss_type], loss_weights=[1.0], args=SimpleNamespace(discopop_tau=0.05),
                              **settings)
    namespace = {"self": trainer, "torch": torch, "F": F, "math": math, "device": "cpu", "out": {},
                 "chosen_logps": logps.policy_chosen, "rejected_logps": logps.policy_rejected,
                 "ref_chosen_logps": logps.ref_chosen, "ref_rejected_logps": logps.ref_rejected,
                 "chosen_logratios": logps.policy_chosen - logps.ref_chosen,
                 "rejected_logratios": logps.policy_rejected - logps.ref_rejected, "completion_mask": mask,
                 "shift_completion_mask": mask, "per_token_logps": per_token}
    exec(compile(block, "trl DPOTrainer._compute_loss", "exec"), namespace)
    assert namespace["out"][loss_type].shape == (n,)
    return namespace["out"][loss_type]


# TRL's loss_type (+ its settings) -> preflab's term; "norm": preflab's rewards are per token where TRL's are summed
CASES = [
    ("sigmoid", {}, {"name": "sigmoid"}),
    ("hinge", {}, {"name": "hinge"}),
    ("ipo", {}, {"name": "ipo", "logp_normalize": "mean"}),
    # (TRL makes ε a float32 tensor: given as a float64 tensor, it stays float64)
    ("exo_pair", {"label_smoothing": torch.tensor(1e-3, dtype=F64)}, {"name": "exo_pair", "epsilon": 1e-3}),
    ("exo_pair", {"label_smoothing": torch.tensor(0.2, dtype=F64)}, {"name": "exo_pair", "epsilon": 0.2}),
    ("nca_pair", {}, {"name": "nca_pair"}),
    ("robust", {}, {"name": "robust"}),
    ("robust", {"label_smoothing": 0.1}, {"name": "robust", "label_smoothing": 0.1}),
    ("bco_pair", {}, {"name": "bco_pair", "reward_shift": 0.0}),  # TRL 1.16 keeps no running mean
    ("sppo_hard", {}, {"name": "sppo_hard"}),
    ("aot", {}, {"name": "aot"}),
    ("aot", {"label_smoothing": 0.1}, {"name": "aot", "label_smoothing": 0.1}),
    ("aot_unpaired", {}, {"name": "aot_unpaired"}),
    ("aot_unpaired", {"label_smoothing": 0.1}, {"name": "aot_unpaired", "label_smoothing": 0.1}),
    ("apo_zero", {}, {"name": "apo_zero"}),
    ("apo_down", {}, {"name": "apo_down"}),
    ("discopop", {}, {"name": "discopop"}),
    ("sigmoid_norm", {}, {"name": "sigmoid_norm"}),
    ("sigmoid", {"f_divergence_type": "forward_kl"}, {"name": "sigmoid", "f_divergence": "forward_kl"}),
    ("sigmoid", {"f_divergence_type": "js_divergence"}, {"name": "sigmoid", "f_divergence": "js_divergence"}),
    ("sigmoid", {"f_divergence_type": "alpha_divergence"}, {"name": "sigmoid", "f_divergence": "alpha_divergence"}),
    ("sigmoid", {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},  # TRL's coef = 1 − α
     {"name": "sigmoid", "f_divergence": "alpha_divergence", "f_alpha": 0.7}),
    ("hinge", {"beta": 0.5}, {"name": "hinge", "beta": 0.5}),
    ("nca_pair", {"beta": 0.5}, {"name": "nca_pair", "beta": 0.5}),
]


def _id(case):
    loss_type, settings, _ = case
    return loss_type + "".join(f"-{k}={float(v) if torch.is_tensor(v) else v}" for k, v in settings.items())


# TRL's alpha_divergence has no float64 entry in its clamp table (KeyError): those cases run in float32
FLOAT32 = {"alpha_divergence"}


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_each_dpo_loss_type_matches_trl(case):
    loss_type, settings, term = case
    logps = _logps()
    tol = 1e-12
    if settings.get("f_divergence_type") in FLOAT32:
        logps, tol = _float32(logps), 1e-6
    ours = build_objective([term])(logps)
    theirs = _trl_dpo_losses(logps, loss_type, **settings)
    assert_close(ours.losses, theirs, rtol=tol, atol=tol)
    assert_close(ours.losses.mean(), theirs.mean(), rtol=tol, atol=tol)  # TRL's reduction
    # TRL's metrics: rewards β·ρ± (summed log-ratios), their margin and accuracy
    beta = settings.get("beta", 0.1)
    per_token = term.get("logp_normalize", "mean" if term["name"] == "sigmoid_norm" else "sum") == "mean"
    scale_c, scale_r = (logps.chosen_tokens, logps.rejected_tokens) if per_token else (1.0, 1.0)
    trl_chosen = beta * (logps.policy_chosen - logps.ref_chosen)
    trl_rejected = beta * (logps.policy_rejected - logps.ref_rejected)
    assert_close(ours.chosen_rewards, trl_chosen / scale_c, rtol=tol, atol=tol)
    assert_close(ours.rejected_rewards, trl_rejected / scale_r, rtol=tol, atol=tol)
    if not per_token:
        assert torch.equal(ours.margin > 0, trl_chosen > trl_rejected)


def test_sft_matches_trl_token_mean_with_equal_lengths():
    """TRL's ``sft`` is the mean NLL over every chosen token of the batch, preflab's (``normalize: mean``) the mean
    over pairs of each chosen response's per-token NLL: equal where lengths are equal, as here."""
    logps = _logps(equal_lengths=True)
    theirs = _trl_dpo_losses(logps, "sft")
    ours = build_objective([{"name": "sft"}])(logps)
    assert_close(ours.losses.mean(), theirs.mean(), rtol=1e-12, atol=1e-12)
    uneven = _logps()
    assert not torch.allclose(build_objective([{"name": "sft"}])(uneven).losses.mean(),
                              _trl_dpo_losses(uneven, "sft").mean())


def _cpo_trainer(loss_type: str, beta: float, gamma: float = 0.5, label_smoothing: float = 0.0):
    return SimpleNamespace(loss_type=loss_type, beta=beta, simpo_gamma=gamma, label_smoothing=label_smoothing,
                           alpha=0.0, accelerator=SimpleNamespace(device="cpu"))


@pytest.mark.parametrize("beta,gamma,eps", [(2.0, 1.0, 0.0), (2.5, 1.375, 0.0), (2.0, 0.5, 0.1)])
def test_simpo_matches_trl_cpo_trainer(beta, gamma, eps):
    from trl.experimental.cpo import CPOTrainer

    logps = _logps()
    ours = build_objective([{"name": "simpo", "beta": beta, "gamma": gamma, "label_smoothing": eps}])(logps)
    mean_c, mean_r = logps.policy_chosen / logps.chosen_tokens, logps.policy_rejected / logps.rejected_tokens
    losses, chosen, rejected = CPOTrainer.cpo_loss(_cpo_trainer("simpo", beta, gamma, eps), mean_c, mean_r)
    assert_close(ours.losses, losses, rtol=1e-12, atol=1e-12)
    assert_close(ours.chosen_rewards, chosen, rtol=1e-12, atol=1e-12)
    assert_close(ours.rejected_rewards, rejected, rtol=1e-12, atol=1e-12)


def test_cpo_matches_trl_cpo_trainer():
    """TRL adds ``cpo_alpha`` times the token-mean NLL of the batch's chosen responses: with equal lengths it is the
    mean of the per-pair NLLs preflab adds."""
    from trl.experimental.cpo import CPOTrainer

    logps = _logps(equal_lengths=True)
    losses, chosen, _ = CPOTrainer.cpo_loss(_cpo_trainer("sigmoid", 0.1), logps.policy_chosen, logps.policy_rejected)
    alone = build_objective([{"name": "cpo", "alpha": 0.0}])(logps)
    assert_close(alone.losses, losses, rtol=1e-12, atol=1e-12)
    assert_close(alone.chosen_rewards, chosen, rtol=1e-12, atol=1e-12)
    nll = -(logps.policy_chosen.sum() / logps.chosen_tokens.sum())  # the cross-entropy over all chosen tokens
    full = build_objective([{"name": "cpo"}])(logps)
    assert_close(full.losses.mean(), losses.mean() + 1.0 * nll, rtol=1e-12, atol=1e-12)


def test_orpo_matches_trl_orpo_trainer():
    """TRL's loss is the token-mean NLL minus the mean of its ``odds_ratio_loss``; with equal lengths the NLL is the
    mean of preflab's per-pair NLLs. TRL computes it in float32 (``.float()``): so do both here."""
    from trl.experimental.orpo import ORPOTrainer

    logps = _float32(_logps(equal_lengths=True))
    mean_c, mean_r = logps.policy_chosen / logps.chosen_tokens, logps.policy_rejected / logps.rejected_tokens
    trainer = SimpleNamespace(beta=0.1, accelerator=SimpleNamespace(device="cpu"))
    losses, chosen, rejected, _, _ = ORPOTrainer.odds_ratio_loss(trainer, mean_c, mean_r)
    ours = build_objective([{"name": "orpo"}])(logps)
    assert_close(ours.losses + mean_c, -losses, rtol=1e-6, atol=1e-6)  # the odds-ratio term, pair by pair
    nll = -(logps.policy_chosen.sum() / logps.chosen_tokens.sum())
    assert_close(ours.losses.mean(), nll - losses.mean(), rtol=1e-6, atol=1e-6)
    assert_close(ours.chosen_rewards, chosen, rtol=1e-6, atol=1e-6)
    assert_close(ours.rejected_rewards, rejected, rtol=1e-6, atol=1e-6)
