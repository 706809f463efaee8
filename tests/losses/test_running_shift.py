"""BCO's running reward shift δ: objective state that training steps update and every other call only reads.

Fixtures of tests/losses/test_hand_values.py, β 0.1: A has rewards r⁺ = βρ⁺ = 0.1, r⁻ = −0.1; B has −0.05, −0.2.
ℓ = L(r⁺ − δ) + L(δ − r⁻), L(x) = −log σ(x).
- Before any step δ = 0 (TRL's RunningMoments starts at mean 0): A gives 2·L(0.1) = 1.288793.
- Observing B alone: δ = (−0.05 − 0.2)/2 = −0.125; B then gives L(0.075) + L(0.075) = 1.312700.
- Observing A, then B: δ = (0.1 − 0.1 − 0.05 − 0.2)/4 = −0.0625 (count 4); B gives L(0.0125) + L(0.1375) =
  1.313675, A gives L(0.1625) + L(0.0375) = 1.289767.
- Two processes, this one observing A and the other B (``reduce`` sums their {sum, count}): δ = −0.0625 at once.
"""

import math

import pytest
import torch
from test_hand_values import logps
from torch.testing import assert_close

from preflab.losses import PairLogps, build_objective


def _bco(**hp):
    return build_objective([{"name": "bco_pair", **hp}])


def _loss(objective, fixture: str) -> float:
    return objective(logps(fixture)).losses.item()


def test_delta_starts_at_zero_and_is_the_mean_of_every_observed_reward():
    objective = _bco()
    assert _loss(objective, "A") == pytest.approx(1.288793, abs=1e-6)
    assert objective.state == {}  # calls read the state, they never change it
    objective.observe([logps("A")])
    assert objective.tracked_mean(0) == pytest.approx(0.0, abs=1e-12)
    objective.observe([logps("B")])
    assert objective.state["0"] == pytest.approx({"mean": -0.0625, "count": 4.0})
    assert _loss(objective, "B") == pytest.approx(1.313675, abs=1e-6)
    assert _loss(objective, "A") == pytest.approx(1.289767, abs=1e-6)
    out = objective(logps("A"))
    assert out.metrics["delta"].tolist() == pytest.approx([-0.0625])  # TRL's metric name


def test_one_observation_of_several_policies_pools_them():
    """OFS observes both modules' log-probs once a step: as one batch of their rewards."""
    objective = _bco()
    objective.observe([logps("B")])
    assert _loss(objective, "B") == pytest.approx(1.312700, abs=1e-6)
    both = _bco()
    both.observe([logps("A"), logps("B")])
    assert both.state["0"] == pytest.approx({"mean": -0.0625, "count": 4.0})


def test_processes_reduce_sum_and_count():
    other_process = {"sum": -0.25, "count": 2.0}  # B's rewards, observed by the other process
    seen = []

    def reduce(record):
        seen.append(dict(record))
        return {k: record[k] + other_process[k] for k in record}

    objective = _bco()
    objective.observe([logps("A")], reduce)
    assert seen == [{"sum": pytest.approx(0.0, abs=1e-12), "count": 2.0}]
    assert objective.state["0"] == pytest.approx({"mean": -0.0625, "count": 4.0})


def test_a_non_finite_step_leaves_the_mean_as_it_is():
    objective = _bco()
    objective.observe([logps("B")])
    bad = logps("A")
    bad = PairLogps(torch.tensor([math.nan], dtype=torch.float64), *list(vars(bad).values())[1:])
    objective.observe([bad])
    assert objective.state["0"] == pytest.approx({"mean": -0.125, "count": 2.0})


def test_a_fixed_shift_tracks_nothing():
    objective = _bco(reward_shift=0.05)
    objective.observe([logps("B")])
    assert objective.state == {}
    assert "delta" not in objective(logps("A")).metrics
    assert _loss(objective, "A") == pytest.approx(1.289417, abs=1e-6)  # L(0.05) + L(0.15)


def test_state_is_shared_by_beta_variants_and_restored_in_place():
    objective = _bco()
    chase = objective.with_beta(0.5)  # OFS's chasing objective reads the same running mean
    objective.observe([logps("B")])
    assert chase.tracked_mean(0) == pytest.approx(-0.125)
    held = objective.state
    objective.load_state({"0": {"mean": 0.25, "count": 8.0}})
    assert objective.state is held and held == {"0": {"mean": 0.25, "count": 8.0}}


def test_the_second_tracking_term_logs_under_its_index():
    objective = build_objective([{"name": "bco_pair"}, {"name": "sigmoid"}, {"name": "bco_pair", "beta": 0.2}])
    objective.observe([logps("B")])
    out = objective(logps("A"))
    assert sorted(out.metrics) == ["delta", "delta/2"]
    assert_close(out.metrics["delta/2"], torch.tensor([-0.25], dtype=torch.float64))  # β 0.2: rewards −0.1, −0.4


def test_the_mean_weights_the_earlier_steps_by_their_count():
    """B then A: δ = −0.125 after B, then (−0.25 + 0)/4 = −0.0625: the earlier mean kept, weighted by its count 2."""
    objective = _bco()
    objective.observe([logps("B")])
    objective.observe([logps("A")])
    assert objective.state["0"] == pytest.approx({"mean": -0.0625, "count": 4.0})


def test_per_token_rewards_are_tracked_under_logp_normalize_mean():
    """B per token (|y±| = 5): rewards −0.01 and −0.04, δ = −0.025."""
    objective = _bco(logp_normalize="mean")
    objective.observe([logps("B")])
    assert objective.tracked_mean(0) == pytest.approx(-0.025)


def test_a_step_without_rewards_anywhere_changes_nothing():
    """A process may hold no pair of an epoch's last batch; where none has any, there is no mean to take."""
    objective = _bco()
    objective.observe([logps("B")])
    empty = PairLogps(*(None if t is None else t[:0] for t in vars(logps("A")).values()))
    objective.observe([empty])
    assert objective.state["0"] == pytest.approx({"mean": -0.125, "count": 2.0})


def test_one_terms_non_finite_values_do_not_stop_the_others():
    """Term 0 reads the length-desensitized log-probs, whose shared part is NaN here; term 1 the plain ones."""
    objective = build_objective([{"name": "bco_pair", "ld_alpha": 0.5}, {"name": "bco_pair"}])
    fields = list(vars(logps("B")).values())
    nan = torch.tensor([math.nan], dtype=torch.float64)
    objective.observe([PairLogps(*fields[:6], nan, nan, nan, nan)])
    assert "0" not in objective.state
    assert objective.state["1"] == pytest.approx({"mean": -0.125, "count": 2.0})


def test_the_function_alone_refuses_an_unfilled_running_mean():
    from preflab.losses.per_response import BCOHParams, bco_pair_loss

    with pytest.raises(ValueError, match=r"^bco_pair: reward_shift null is the running mean, which an Objective fills "
                                         r"in \(build it with preflab.losses.build_objective\)$"):
        bco_pair_loss(logps("A"), BCOHParams())
