"""The peers' objectives (TRL's loss types, SimPO, ORPO, CPO) on hand-worked fixtures.

The fixtures of tests/losses/test_hand_values.py, |y⁺| = |y⁻| = 5 tokens, β = 0.1 unless said:
A: logp_θ = −10 / −12, reference −11 / −11 → ρ⁺ = 1, ρ⁻ = −1, h = 2, z = βh = 0.2.
B: logp_θ = −11.5 / −13, reference −11 / −11 → ρ⁺ = −0.5, ρ⁻ = −2, h = 1.5, z = 0.15.
With L(x) = log(1 + e^−x) = −log σ(x): L(0.2) = 0.598139, L(−0.2) = 0.798139, L(0.1) = 0.644397, L(−0.1) = 0.744397.

robust (ε 0.1): [0.9·L(z) − 0.1·L(−z)] / 0.8. A: (0.538325 − 0.079814)/0.8 = 0.573139. B: 0.602207.
exo_pair (ε 1e-3): q = σ(z); q·(log q − log 0.999) + (1−q)·(log(1−q) − log 0.001).
  A: q = 0.549834: 0.549834·(−0.598139 + 0.001001) + 0.450166·(−0.798139 + 6.907755) = 2.422015. B: 2.505517.
nca_pair: L(βρ⁺) + ½·L(−βρ⁺) + ½·L(−βρ⁻). A: L(0.1) + ½·L(−0.1) + ½·L(0.1) = 1.338793. B: 1.351759.
bco_pair: L(βρ⁺ − δ) + L(δ − βρ⁻). A, δ 0: 2·L(0.1) = 1.288793; δ 0.05: L(0.05) + L(0.15) = 1.289417.
  B: L(−0.05) + L(0.2) = 1.316599.
apo_zero: (1 − σ(βρ⁺)) + σ(βρ⁻). A: 2·(1 − σ(0.1)) = 2·0.475021 = 0.950042. B: 0.962663.
apo_down: σ(βρ⁺) + 1 − σ(z). A: 0.524979 + 0.450166 = 0.975145. B: 0.950073.
discopop (τ 0.05): w = σ(z/τ); (1 − w)·L(z) + w·e^−z. A: w = σ(4) = 0.982014:
  0.017986·0.598139 + 0.982014·0.818731 = 0.814763. B: w = σ(3) = 0.952574: 0.849338.
sigmoid, f_divergence (h = f'(e^ρ⁺) − f'(e^ρ⁻), constants dropped), loss L(β·h):
  forward_kl, f' = −1/u: A: h = −e^−1 + e^1 = 2.350402 → L(0.235040) = 0.582517. B: h = −e^0.5 + e^2 = 5.740335
  → 0.446766. js_divergence, f' = log σ(ρ): A: h = log σ(1) − log σ(−1) = 1 → L(0.1) = 0.644397. B: 0.637165.
  alpha_divergence α 0.5, f' = −e^(−αρ)/α: A: h = −2e^−0.5 + 2e^0.5 = 2.084381 → 0.594349. B: 0.559972.
sigmoid_norm: per-token ρ: A: 0.2 / −0.2 → L(0.1·0.4) = L(0.04) = 0.673347. B: −0.1 / −0.4 → L(0.03) = 0.678260.
simpo (β 2, γ 1): l̄ = logp/5. A: −2 / −2.4 → L(2·0.4 − 1) = L(−0.2) = 0.798139. B: −2.3 / −2.6 → L(−0.4)
  = 0.913015.
orpo (λ 0.1): log odds(l̄) = l̄ − log(1 − e^l̄). A: −1.854587 and −2.304900, difference 0.450314,
  log σ = −0.493127 → 2 + 0.0493127 = 2.049313. B: difference 0.328472 → 2.3 + 0.0542338 = 2.354234.
  With ε 0.1, A: 0.9·L(−0.2) + 0.1·L(0.2) = 0.778139; γ 0 (allowed), A: L(0.8) = 0.371101.
cpo (β 0.1, α 1): L(β·(logp⁺ − logp⁻)) + α·NLL. A: L(0.2) + 10/5 = 2.598139 (nll_normalize sum: + 10 →
  10.598139; ε 0.1: 0.9·L(0.2) + 0.1·L(−0.2) + 2 = 2.618139; logp_normalize mean: L(0.1·0.4) + 2 = 2.673347).
  B: L(0.15) + 2.3 = 2.920957.
aot / aot_unpaired on a batch of two pairs, ref of pair 1 changed to −11 / −9 (ρ⁺ 1 / −0.5, ρ⁻ −3 / −2):
  aot: sort(policy margins 2, 1.5) − sort(reference margins −2, 0) = (1.5 + 2, 2 − 0) → L(0.35), L(0.2) =
  0.533382, 0.598139 (pairwise DPO would be L(0.4), L(0.15)).
  aot_unpaired: sort(ρ⁺) − sort(ρ⁻) = (−0.5 + 3, 1 + 2) → L(0.25), L(0.3) = 0.575939, 0.554355.
"""

import math

import pytest
import torch
from test_hand_values import logps
from torch.testing import assert_close

from preflab.losses import PairLogps, build_objective

EXPECTED = {
    ("robust", (("label_smoothing", 0.1),)): {"A": 0.573139, "B": 0.602207},
    ("robust", ()): {"A": 0.598139, "B": 0.620957},  # ε = 0 is DPO
    ("exo_pair", ()): {"A": 2.422015, "B": 2.505517},
    ("nca_pair", ()): {"A": 1.338793, "B": 1.351759},
    ("bco_pair", ()): {"A": 1.288793, "B": 1.316599},
    ("bco_pair", (("reward_shift", 0.05),)): {"A": 1.289417, "B": 1.320336},
    ("apo_zero", ()): {"A": 0.950042, "B": 0.962663},
    ("apo_down", ()): {"A": 0.975145, "B": 0.950073},
    ("discopop", ()): {"A": 0.814763, "B": 0.849338},
    ("sigmoid", (("f_divergence", "forward_kl"),)): {"A": 0.582517, "B": 0.446766},
    ("sigmoid", (("f_divergence", "js_divergence"),)): {"A": 0.644397, "B": 0.637165},
    ("sigmoid", (("f_divergence", "alpha_divergence"),)): {"A": 0.594349, "B": 0.559972},
    ("sigmoid_norm", ()): {"A": 0.673347, "B": 0.678260},
    ("simpo", ()): {"A": 0.798139, "B": 0.913015},
    ("orpo", ()): {"A": 2.049313, "B": 2.354234},
    ("cpo", ()): {"A": 2.598139, "B": 2.920957},
    ("cpo", (("nll_normalize", "sum"),)): {"A": 10.598139, "B": 12.120957},
}
ONLY_A = {("simpo", (("label_smoothing", 0.1),)): 0.778139, ("simpo", (("gamma", 0.0),)): 0.371101,
          ("cpo", (("label_smoothing", 0.1),)): 2.618139, ("cpo", (("logp_normalize", "mean"),)): 2.673347}


@pytest.mark.parametrize("key", list(ONLY_A), ids=lambda k: k[0] + "".join(f"-{a}={b}" for a, b in k[1]))
def test_hand_values_of_the_options(key):
    name, extra = key
    out = build_objective([{"name": name, **dict(extra)}])(logps("A"))
    assert_close(out.losses, torch.tensor([ONLY_A[key]], dtype=torch.float64), atol=1e-6, rtol=0)


def test_alpha_divergence_clamps_its_exponent_at_80_as_trl_does():
    from preflab.losses.dpo import f_prime

    rho = torch.tensor([-200.0, -100.0, 0.0], dtype=torch.float64)  # −αρ = 100, 50, 0 at α = 0.5
    expected = torch.tensor([-2 * math.exp(80.0), -2 * math.exp(50.0), -2.0], dtype=torch.float64)
    assert_close(f_prime(rho, "alpha_divergence", 0.5), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("key", list(EXPECTED), ids=lambda k: k[0] + "".join(f"-{a}={b}" for a, b in k[1]))
@pytest.mark.parametrize("fixture", ["A", "B"])
def test_hand_values(key, fixture):
    name, extra = key
    out = build_objective([{"name": name, **dict(extra)}])(logps(fixture))
    assert_close(out.losses, torch.tensor([EXPECTED[key][fixture]], dtype=torch.float64), atol=1e-6, rtol=0)


def _batch() -> PairLogps:
    t = lambda *v: torch.tensor(v, dtype=torch.float64)
    return PairLogps(t(-10.0, -11.5), t(-12.0, -13.0), t(-11.0, -11.0), t(-9.0, -11.0), t(5.0, 5.0), t(5.0, 5.0))


@pytest.mark.parametrize("name,expected", [("aot", (0.533382, 0.598139)), ("aot_unpaired", (0.575939, 0.554355))])
def test_aot_compares_the_batch_quantile_by_quantile(name, expected):
    out = build_objective([{"name": name}])(_batch())
    assert_close(out.losses, torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)
    assert_close(out.chosen_rewards, torch.tensor([0.1, -0.05], dtype=torch.float64))  # DPO's, pair by pair
    one = build_objective([{"name": "aot"}])(logps("A"))  # one pair: nothing to sort, DPO
    assert_close(one.losses, build_objective([{"name": "sigmoid"}])(logps("A")).losses)


@pytest.mark.parametrize("name,beta,scale", [("simpo", 2.0, 5.0), ("cpo", 0.1, 1.0), ("orpo", 0.1, 5.0)])
def test_reference_free_rewards_are_the_policys_own_scaled_log_probs(name, beta, scale):
    out = build_objective([{"name": name}])(logps("A"))  # l = −10 / −12 (per token for simpo and orpo)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == pytest.approx(
        (beta * -10 / scale, beta * -12 / scale), abs=1e-12)
    assert out.margin.item() == pytest.approx(2 / scale, abs=1e-12)


def test_orpo_log_odds_are_exact_near_a_certain_response():
    from preflab.losses.reference_free import log_odds

    near_one = torch.tensor([-1e-12], dtype=torch.float64)  # P = 1 − 1e-12: log odds = log((1 − 1e-12)/1e-12)
    assert log_odds(near_one).item() == pytest.approx(27.631021, abs=1e-5)


@pytest.mark.parametrize("name,bad", [("robust", {"label_smoothing": 0.5}), ("exo_pair", {"epsilon": 0.0}),
                                      ("exo_pair", {"epsilon": 0.5}), ("discopop", {"tau": 0.0}),
                                      ("sigmoid", {"f_divergence": "kl"}), ("sigmoid", {"f_alpha": 1.0}),
                                      ("simpo", {"gamma": -0.1}), ("orpo", {"lambda_": 0.0}),
                                      ("cpo", {"alpha": -1.0}), ("cpo", {"nll_normalize": "max"}),
                                      ("sigmoid", {"f_alpha": 0.0}), ("simpo", {"label_smoothing": 0.5}),
                                      ("cpo", {"label_smoothing": 0.5}), ("robust", {"label_smoothing": -0.1}),
                                      ("nca_pair", {"beta": 0.0})])
def test_bad_hyperparameters_name_the_field(name, bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        build_objective([{"name": name, **bad}])


def test_kto_pair_reference_points_are_batch_means_of_the_log_ratios():
    """A and B in one batch: z⁺ = max(0, mean(1, −0.5)) = 0.25, z⁻ = max(0, mean(−1, −2)) = 0.
    A: ½·[(1 − σ(0.1·(1 − 0))) + (1 − σ(0.1·(0.25 + 1)))] = ½·(0.475021 + 0.468791) = 0.471906.
    B: ½·[(1 − σ(−0.05)) + (1 − σ(0.1·(0.25 + 2)))] = ½·(0.512497 + 0.443986) = 0.478242.
    The paper's z carries no gradient; with ``detach_kl: false`` (TRL ≤ 0.9) z⁺ passes one: ∂z⁺/∂logp_θ(y⁺_A) = ½."""
    batch = PairLogps(*(None if a is None else torch.cat([a, b])
                        for a, b in zip(vars(logps("A")).values(), vars(logps("B")).values())))
    out = build_objective([{"name": "kto_pair"}])(batch)
    assert_close(out.losses, torch.tensor([0.471906, 0.478242], dtype=torch.float64), atol=1e-6, rtol=0)
    assert_close(out.chosen_rewards, torch.tensor([0.1, -0.05], dtype=torch.float64))
    grads = {}
    for detach in (True, False):
        leaf = batch.policy_chosen.clone().requires_grad_(True)
        pair = PairLogps(leaf, *list(vars(batch).values())[1:])
        build_objective([{"name": "kto_pair", "detach_kl": detach}])(pair).losses.sum().backward()
        grads[detach] = leaf.grad
    # detached: ∂ℓ_A/∂logp⁺_A = −½·β·σ'(0.1) = −0.05·0.249376 = −0.012469
    assert grads[True][0].item() == pytest.approx(-0.05 * 0.249376, abs=1e-6)
    # and through z⁺, in the rejected halves of both pairs: ½ · (−½·β·σ'(β·(z⁺ − ρ⁻_i))) each
    through = -0.5 * 0.05 * (0.249026 + 0.246862)
    assert grads[False][0].item() == pytest.approx(-0.05 * 0.249376 + through, abs=1e-6)


def test_kto_pair_with_both_reference_points_above_zero():
    """ρ⁺ = 2, 1 and ρ⁻ = 0.5, 1.5 (reference −10 throughout): z⁺ = 1.5, z⁻ = 1.
    Pair 1: ½·[(1 − σ(0.1·(2 − 1))) + (1 − σ(0.1·(1.5 − 0.5)))] = 1 − σ(0.1) = 0.475021.
    Pair 2: ½·[(1 − σ(0.1·(1 − 1))) + (1 − σ(0.1·(1.5 − 1.5)))] = 0.5."""
    t = lambda *v: torch.tensor(v, dtype=torch.float64)
    batch = PairLogps(t(-8.0, -9.0), t(-9.5, -8.5), t(-10.0, -10.0), t(-10.0, -10.0), t(5.0, 5.0), t(5.0, 5.0))
    out = build_objective([{"name": "kto_pair"}])(batch)
    assert_close(out.losses, torch.tensor([0.475021, 0.5], dtype=torch.float64), atol=1e-6, rtol=0)
