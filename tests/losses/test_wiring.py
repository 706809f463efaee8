"""How objectives are assembled: registration, normalisation, which term reports rewards, β, and the bounds of
every hyperparameter (with the field named in the message)."""

import dataclasses

import pytest
import torch

from preflab.losses import LossOutput, PairLogps, build_objective, loss_registry, register_loss
from preflab.losses.base import LossHParams
from preflab.losses.dpo import SigmoidHParams
from preflab.losses.sft import SFTHParams

F64 = torch.float64
NAMES = sorted(loss_registry())


def _logps(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    draw = lambda: -torch.rand(n, generator=g, dtype=F64) * 30
    counts = lambda: torch.randint(2, 9, (n,), generator=g).to(F64)
    return PairLogps(draw(), draw(), draw(), draw(), counts(), counts())


def test_register_loss_adds_a_spec_and_refuses_a_name_twice():
    fn = lambda logps, hp: LossOutput(-logps.policy_chosen)
    register_loss("_test_only", fn, LossHParams)
    try:
        spec = loss_registry()["_test_only"]
        assert (spec.name, spec.fn, spec.hparams, spec.reference_free) == ("_test_only", fn, LossHParams, False)
        with pytest.raises(ValueError, match="^loss '_test_only' registered twice$"):
            register_loss("_test_only", fn, LossHParams, reference_free=True)
        register_loss("_test_only_free", fn, LossHParams, reference_free=True)
        assert loss_registry()["_test_only_free"].reference_free
    finally:
        from preflab.losses import base

        base._REGISTRY.pop("_test_only", None)
        base._REGISTRY.pop("_test_only_free", None)
    assert {n for n, s in loss_registry().items() if s.reference_free} == {"cpo", "orpo", "sft", "simpo"}


# (sft and cpo's NLL term have their own normalize key; simpo, orpo and sigmoid_norm are per-token by default)
PER_SEQUENCE = [n for n in NAMES if n not in ("sft", "cpo") and loss_registry()[n].hparams().logp_normalize == "sum"]


@pytest.mark.parametrize("name", PER_SEQUENCE)
def test_mean_normalisation_is_the_sum_objective_of_per_token_log_probs(name):
    logps = _logps()
    per_token = PairLogps(*(t / c for t, c in ((logps.policy_chosen, logps.chosen_tokens),
                                               (logps.policy_rejected, logps.rejected_tokens),
                                               (logps.ref_chosen, logps.chosen_tokens),
                                               (logps.ref_rejected, logps.rejected_tokens))),
                          logps.chosen_tokens, logps.rejected_tokens)
    mean = build_objective([{"name": name, "logp_normalize": "mean"}])(logps)
    summed = build_objective([{"name": name, "logp_normalize": "sum"}])(per_token)
    for a, b in ((mean.losses, summed.losses), (mean.chosen_rewards, summed.chosen_rewards),
                 (mean.margin, summed.margin)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(mean.losses, build_objective([{"name": name}])(logps).losses)


def test_a_half_given_reference_is_refused():
    logps = dataclasses.replace(_logps(), ref_rejected=None)
    with pytest.raises(ValueError, match="^this objective needs reference log-probs, but none were given$"):
        build_objective([{"name": "sigmoid"}])(logps)


def test_the_first_term_with_rewards_reports_them_and_margins_are_differences():
    logps = _logps()
    rho_c, rho_r = logps.policy_chosen - logps.ref_chosen, logps.policy_rejected - logps.ref_rejected
    out = build_objective([{"name": "sft", "weight": 0.1}, {"name": "sigmoid", "beta": 0.1},
                           {"name": "ipo", "beta": 0.5}])(logps)
    torch.testing.assert_close(out.chosen_rewards, 0.1 * rho_c, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.rejected_rewards, 0.1 * rho_r, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.margin, rho_c - rho_r, rtol=1e-12, atol=0)
    alone = build_objective([{"name": "sft"}])(logps)  # reference-free: the policy's own log-prob margin
    torch.testing.assert_close(alone.margin, logps.policy_chosen - logps.policy_rejected, rtol=0, atol=0)
    assert alone.chosen_rewards is None and alone.reward_margin is None


def test_kl_strength_is_the_first_beta():
    assert SigmoidHParams(beta=0.3).kl_strength() == 0.3 and SFTHParams().kl_strength() is None
    assert build_objective([{"name": "sft"}, {"name": "hinge", "beta": 0.2}]).kl_strength() == 0.2
    assert build_objective([{"name": "sft"}]).kl_strength() is None
    with pytest.raises(ValueError, match=r"^no term of the objective \(sft, sft\) has a beta$"):
        build_objective([{"name": "sft"}, {"name": "sft"}]).with_beta(0.1)


@pytest.mark.parametrize("name,field,bad,good", [
    ("sigmoid", "beta", [0, -1], [1e-6]), ("sigmoid", "label_smoothing", [0.5, -0.1], [0.0, 0.49]),
    ("flex", "beta_chosen", [0], [1e-6]), ("flex", "beta_rejected", [0], [1e-6]),
    ("dpop", "beta", [0], [1e-6]), ("dpop", "lambda_", [-1e-9], [0.0, 0.5]),
    ("ipo", "beta", [0], [1e-6]), ("hinge", "beta", [0], [1e-6]),
    ("sppo_hard", "beta", [0], [1e-6]), ("sppo_hard", "scale", [0], [1e-6]),
    ("cal_dpo", "beta", [0], [1e-6]), ("cal_dpo", "cal_weight", [-0.1], [0.0]),
    ("sft", "normalize", ["avg"], ["sum", "mean"]), ("sigmoid", "logp_normalize", ["max"], ["sum", "mean"]),
])
def test_hyperparameter_bounds_name_the_field(name, field, bad, good):
    for value in bad:
        with pytest.raises(ValueError, match=f"^{field}: "):
            build_objective([{"name": name, field: value}])
    for value in good:
        assert getattr(build_objective([{"name": name, field: value}]).terms[0][1], field) == value
