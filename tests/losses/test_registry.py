"""Properties every registered objective must have."""

import dataclasses

import pytest
import torch

from preflab.losses import PairLogps, build_objective, loss_registry

NAMES = sorted(loss_registry())


def _random_logps(seed=0, n=8):
    gen = torch.Generator().manual_seed(seed)
    draw = lambda: (-torch.rand(n, generator=gen, dtype=torch.float64) * 40).requires_grad_(True)
    return PairLogps(draw(), draw(), -torch.rand(n, dtype=torch.float64) * 40,
                     -torch.rand(n, dtype=torch.float64) * 40, torch.full((n,), 6.0, dtype=torch.float64),
                     torch.full((n,), 9.0, dtype=torch.float64))


@pytest.mark.parametrize("name", NAMES)
def test_finite_unreduced_and_detached(name):
    logps = _random_logps()
    out = build_objective([{"name": name}])(logps)
    assert out.losses.shape == (8,)
    assert torch.isfinite(out.losses).all()
    for t in (out.chosen_rewards, out.rejected_rewards, out.margin):
        assert t is None or not t.requires_grad
    out.losses.sum().backward()
    assert logps.policy_chosen.grad is not None and torch.isfinite(logps.policy_chosen.grad).all()


@pytest.mark.parametrize("name", NAMES)
def test_reference_free_objectives_ignore_the_reference(name):
    spec = loss_registry()[name]
    logps = _random_logps()
    no_ref = dataclasses.replace(logps, ref_chosen=None, ref_rejected=None)
    objective = build_objective([{"name": name}])
    if spec.reference_free:
        torch.testing.assert_close(objective(logps).losses, objective(no_ref).losses)
    else:
        with pytest.raises(ValueError, match="reference"):
            objective(no_ref)


@pytest.mark.parametrize("name", [n for n in NAMES if not loss_registry()[n].reference_free])
def test_policy_equal_to_reference_gives_zero_rewards(name):
    x = -torch.rand(4, dtype=torch.float64) * 10
    n = torch.full((4,), 3.0, dtype=torch.float64)
    out = build_objective([{"name": name}])(PairLogps(x, x + 1, x, x + 1, n, n))
    assert torch.all(out.chosen_rewards == 0) and torch.all(out.rejected_rewards == 0)
    assert torch.all(out.margin == 0)


@pytest.mark.parametrize("name,bad", [("sigmoid", {"beta": 0}), ("sigmoid", {"label_smoothing": 0.5}),
                                      ("flex", {"beta_rejected": -0.1}), ("ipo", {"logp_normalize": "max"}),
                                      ("dpop", {"lambda_": -1}), ("sft", {"normalize": "avg"}),
                                      ("sft", {"logp_normalize": "mean"})])  # (sft's own key is normalize)
def test_bad_hyperparameters_name_the_field(name, bad):
    field = next(iter(bad))
    with pytest.raises(ValueError, match=field):
        build_objective([{"name": name, **bad}])


def test_with_beta_sets_the_kl_strength_of_every_term_that_has_one():
    objective = build_objective([{"name": "flex", "beta_chosen": 0.1, "beta_rejected": 0.05}, {"name": "sft"},
                                 {"name": "ipo", "beta": 0.3}])
    assert objective.kl_strength() == 0.1
    scaled = objective.with_beta(0.4)
    flex, sft, ipo = (hp for _, hp in scaled.terms)
    assert (flex.beta_chosen, flex.beta_rejected, ipo.beta) == (0.4, pytest.approx(0.2), 0.4)
    assert sft == objective.terms[1][1] and scaled.kl_strength() == 0.4
    with pytest.raises(ValueError, match=r"no term of the objective \(sft\) has a beta"):
        build_objective([{"name": "sft"}]).with_beta(0.1)


@pytest.mark.parametrize("name", [n for n in NAMES if not loss_registry()[n].reference_free])
def test_the_reward_margin_is_the_difference_of_the_rewards_with_its_gradient(name):
    logps = _random_logps()
    out = build_objective([{"name": name}])(logps)
    assert out.reward_margin.requires_grad
    torch.testing.assert_close(out.reward_margin.detach(), out.chosen_rewards - out.rejected_rewards, rtol=1e-12,
                               atol=1e-12)
