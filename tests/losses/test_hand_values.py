"""T1 of the spec (../shared/methods/dpo-and-3d.md §6): every objective on two hand-worked fixtures.

Settings: β 0.1, Flex betas 0.1/0.08, ε 0.1, λ 50, Cal-DPO w 0.5 (β 0.1 here), |y⁺| = |y⁻| = 5 tokens.

Fixture A: logp_θ(y⁺) = −10, logp_θ(y⁻) = −12, reference −11/−11 → ρ⁺ = 1, ρ⁻ = −1, h = 2.
  sigmoid: −log σ(0.2) = log(1 + e^−0.2) = 0.598139; ε=0.1: 0.9·0.598139 + 0.1·log(1 + e^0.2) = 0.618139
  ipo: (2 − 5)² = 9; hinge: 1 − 0.2 = 0.8; sppo_hard: (1 − 5)² + (−1 + 5)² = 32
  flex: −log σ(0.1·1 + 0.08·1) = −log σ(0.18) = 0.607192; dpop: penalty inactive (ρ⁺ > 0) = sigmoid
  cal_dpo: −log σ(2) + 0.5·32 = 0.126928 + 16; sft: 10 (sum) / 2 (mean over 5 tokens)
Fixture B: −11.5 / −13, reference −11/−11 → ρ⁺ = −0.5, ρ⁻ = −2, h = 1.5.
  sigmoid: log(1 + e^−0.15) = 0.620957; ε: 0.9·0.620957 + 0.1·0.770957 = 0.635957
  ipo: (1.5 − 5)² = 12.25; hinge: 0.85; sppo_hard: 5.5² + 3² = 39.25; flex: −log σ(−0.05 + 0.16) = 0.639659
  dpop: −log σ(0.1·(1.5 − 50·0.5)) = log(1 + e^2.35) = 2.441091; cal_dpo: 0.201413 + 19.625; sft: 11.5 / 2.3
"""

import pytest
import torch
from torch.testing import assert_close

from preflab.losses import PairLogps, build_objective

FIXTURES = {"A": (-10.0, -12.0), "B": (-11.5, -13.0)}

EXPECTED = {
    ("sigmoid", ()): {"A": 0.598139, "B": 0.620957},
    ("sigmoid", (("label_smoothing", 0.1),)): {"A": 0.618139, "B": 0.635957},
    ("ipo", ()): {"A": 9.0, "B": 12.25},
    ("hinge", ()): {"A": 0.8, "B": 0.85},
    ("sppo_hard", ()): {"A": 32.0, "B": 39.25},
    ("flex", ()): {"A": 0.607192, "B": 0.639659},
    ("dpop", ()): {"A": 0.598139, "B": 2.441091},
    ("cal_dpo", (("beta", 0.1),)): {"A": 16.126928, "B": 19.826413},
    ("sft", (("normalize", "sum"),)): {"A": 10.0, "B": 11.5},
    ("sft", (("normalize", "mean"),)): {"A": 2.0, "B": 2.3},
}


def logps(fixture: str) -> PairLogps:
    c, r = FIXTURES[fixture]
    t = lambda v: torch.tensor([v], dtype=torch.float64)
    return PairLogps(t(c), t(r), t(-11.0), t(-11.0), t(5.0), t(5.0))


@pytest.mark.parametrize("key", list(EXPECTED), ids=lambda k: k[0] + "".join(f"-{a}={b}" for a, b in k[1]))
@pytest.mark.parametrize("fixture", ["A", "B"])
def test_hand_values(key, fixture):
    name, extra = key
    objective = build_objective([{"name": name, **dict(extra)}])
    out = objective(logps(fixture))
    assert_close(out.losses, torch.tensor([EXPECTED[key][fixture]], dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("fixture,expected", [("A", (0.1, -0.1, 0.2)), ("B", (-0.05, -0.2, 0.15))])
def test_rewards_and_margin(fixture, expected):
    out = build_objective([{"name": "sigmoid"}])(logps(fixture))
    got = (out.chosen_rewards.item(), out.rejected_rewards.item(), (out.chosen_rewards - out.rejected_rewards).item())
    assert got == pytest.approx(expected, abs=1e-9)


def test_flex_rewards_use_their_own_betas():
    out = build_objective([{"name": "flex"}])(logps("A"))  # ρ⁺ = 1, ρ⁻ = −1
    assert out.chosen_rewards.item() == pytest.approx(0.1)
    assert out.rejected_rewards.item() == pytest.approx(-0.08)


def test_weighted_sum_adds_terms_with_weights():
    """sigmoid + 0.1·sft(sum) on fixture A: 0.598139 + 0.1·10."""
    out = build_objective([{"name": "sigmoid"}, {"name": "sft", "weight": 0.1, "normalize": "sum"}])(logps("A"))
    assert_close(out.losses, torch.tensor([1.598139], dtype=torch.float64), atol=1e-6, rtol=0)
    assert out.chosen_rewards.item() == pytest.approx(0.1)  # rewards come from the first term that has them


def test_mean_normalization_divides_log_ratios_by_token_count():
    """ipo with logp_normalize=mean on A: per-token h = 2/5 = 0.4 → (0.4 − 5)² = 21.16."""
    out = build_objective([{"name": "ipo", "logp_normalize": "mean"}])(logps("A"))
    assert out.losses.item() == pytest.approx(21.16, abs=1e-9)
