"""APO's extrapolation against the spec's arithmetic, its exact tabular case and a stochastic bandit.

The inner step of the tabular and bandit problems is preflab's own ``sigmoid`` objective on tabular log-probs;
the outer step is :func:`preflab.train.apo.extrapolate`, the function the schedule applies to model weights.
"""

import pytest
import torch

from preflab.losses import PairLogps, build_objective
from preflab.train.apo import extrapolate


def _apo_path(hats: list[dict], alpha: float) -> list[dict]:
    """θ_1..θ_T from DPO outputs θ̂_0..θ̂_T, the way the schedule anchors them (on θ̂_t, never on θ_t)."""
    return [extrapolate(hats[t + 1], hats[t], alpha) for t in range(len(hats) - 1)]


def test_arithmetic_anchors_on_the_previous_dpo_output():
    hats = [{"w": torch.tensor(v)} for v in (0.0, 1.0, 3.0)]
    thetas = _apo_path(hats, 0.3)
    assert thetas[0]["w"].item() == pytest.approx(1.3)
    assert thetas[1]["w"].item() == pytest.approx(3.6)  # 3.51 would mean the anchor was θ_1


def test_alpha_zero_returns_the_dpo_output_itself():
    new = {"w": torch.randn(3, 3)}
    assert extrapolate(new, {"w": torch.randn(3, 3)}, 0.0) is new


def test_anchor_must_have_every_tensor():
    with pytest.raises(ValueError, match="lacks tensors"):
        extrapolate({"a": torch.ones(1), "b": torch.ones(1)}, {"a": torch.ones(1)}, 0.3)


def test_adapter_deltas_get_the_spec_coefficients():
    """Merged weights: θ_t = θ_0 + Σ_j a_{t,j}·D_j with a_{t,j} = (1 − α^(t+2−j))/(1 − α), θ̂_{t+1} = θ_t + D_{t+1}."""
    torch.manual_seed(0)
    alpha, w0 = 0.3, torch.randn(8, 8, dtype=torch.float64)
    deltas = [torch.randn(8, 8, dtype=torch.float64) for _ in range(3)]  # D_1..D_3, each learnt on top of θ_{j-1}
    theta, hats = {"w": w0}, [{"w": w0}]
    for t, d in enumerate(deltas):
        hats.append({"w": theta["w"] + d})
        if t < len(deltas) - 1:
            theta = extrapolate(hats[-1], hats[-2], alpha)
            # θ_{t+1}: a_{t+1,j} = (1 − α^(t+3−j))/(1 − α)
            expected = w0 + sum((1 - alpha ** (t + 3 - j)) / (1 - alpha) * deltas[j - 1] for j in range(1, t + 2))
            torch.testing.assert_close(theta["w"], expected, rtol=1e-12, atol=1e-12)
    coeffs = [1.39, 1.3, 1.0]  # the returned θ̂_3
    torch.testing.assert_close(hats[-1]["w"], w0 + sum(c * d for c, d in zip(coeffs, deltas)), rtol=1e-12, atol=1e-12)


# -- A4: exact tabular case --------------------------------------------------------------------------------


def _population_dpo(theta_t: torch.Tensor, reward: torch.Tensor, beta: float) -> torch.Tensor:
    """argmin over logits of Σ_{y≠y'} −σ(r_y − r_y')·log σ(β(ρ_y − ρ_y')), init = reference = θ_t (L-BFGS, fp64)."""
    objective = build_objective([{"name": "sigmoid", "beta": beta}])
    n = len(reward)
    ys, ys_ = zip(*[(a, b) for a in range(n) for b in range(n) if a != b])
    ys, ys_ = torch.tensor(ys), torch.tensor(ys_)
    weights = torch.sigmoid(reward[ys] - reward[ys_])
    ref = torch.log_softmax(theta_t, 0)
    theta = theta_t.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=500, tolerance_grad=1e-10, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")
    ones = torch.ones(len(ys), dtype=torch.float64)

    def closure():
        opt.zero_grad()
        logp = torch.log_softmax(theta, 0)
        out = objective(PairLogps(logp[ys], logp[ys_], ref[ys], ref[ys_], ones, ones))
        loss = (weights * out.losses).sum()
        loss.backward()
        return loss

    for _ in range(20):
        opt.step(closure)
        if theta.grad.abs().max() < 1e-10:
            break
    assert theta.grad.abs().max() < 1e-8
    return theta.detach()


@pytest.mark.parametrize("alpha, steps, expected_c", [(0.3, 7, [1, 2.3, 3.69, 5.107, 6.5321]),
                                                      (0.0, 8, [1, 2, 3, 4, 5])])
def test_tabular_case_matches_the_closed_form(alpha, steps, expected_c):
    reward = torch.tensor([1.0, 0.5, 0.0, 0.0], dtype=torch.float64)
    beta = 1.0
    theta = torch.zeros(4, dtype=torch.float64)  # π_ref uniform
    hats = [{"w": theta}]
    probs = []
    for t in range(steps):
        hat = _population_dpo(theta, reward, beta)
        hats.append({"w": hat})
        logratio = torch.log_softmax(hat, 0) - torch.log_softmax(torch.zeros(4, dtype=torch.float64), 0)
        if t < len(expected_c):  # log π̂_{t+1} − log π_ref = c_t·r/β + const
            centred = logratio - logratio.mean()
            torch.testing.assert_close(centred, expected_c[t] * (reward - reward.mean()) / beta, atol=1e-5, rtol=0)
        probs.append(torch.softmax(hat, 0)[0].item())
        theta = extrapolate(hats[-1], hats[-2], alpha)["w"]
    first = next(i + 1 for i, p in enumerate(probs) if p >= 0.95)
    assert first == (5 if alpha else 7)
    if alpha:
        assert probs[3] == pytest.approx(0.9175, abs=1e-4) and probs[4] == pytest.approx(0.9606, abs=1e-4)
    else:
        assert probs[5] == pytest.approx(0.9481, abs=1e-4) and probs[6] == pytest.approx(0.9690, abs=1e-4)


# -- A5: stochastic bandit, end to end ---------------------------------------------------------------------


def _bandit_iterations(seed: int, alpha: float, target: float = 0.9, cap: int = 25) -> int:
    """Iterations until min_x π̂_t(y*|x) >= target (cap + 1 if never); 4 prompts × 10 responses, tabular policy."""
    g = torch.Generator().manual_seed(seed)
    theta_ref = torch.randn(4, 10, generator=g)
    reward = torch.randn(4, 10, generator=g)
    best = reward.argmax(1)
    objective = build_objective([{"name": "sigmoid", "beta": 0.1}])
    sampler = torch.Generator().manual_seed(10_000 + seed)  # the same stream in both arms
    theta, hats = theta_ref, [{"w": theta_ref}]
    for it in range(1, cap + 1):
        x = torch.randint(0, 4, (64,), generator=sampler)
        ys = torch.multinomial(torch.softmax(theta[x], 1), 5, replacement=True, generator=sampler)
        r = reward[x.unsqueeze(1), ys]
        chosen, rejected = ys[torch.arange(64), r.argmax(1)], ys[torch.arange(64), r.argmin(1)]
        keep = chosen != rejected  # ties (the same response) make no pair
        x, chosen, rejected = x[keep], chosen[keep], rejected[keep]
        ref = torch.log_softmax(theta, 1)
        w = theta.clone().requires_grad_(True)
        opt = torch.optim.Adam([w], lr=0.02)
        ones = torch.ones(len(x))
        for _ in range(20):
            logp = torch.log_softmax(w, 1)
            out = objective(PairLogps(logp[x, chosen], logp[x, rejected], ref[x, chosen], ref[x, rejected], ones, ones))
            opt.zero_grad()
            out.losses.mean().backward()
            opt.step()
        hats.append({"w": w.detach()})
        if torch.softmax(hats[-1]["w"], 1)[torch.arange(4), best].min() >= target:
            return it
        theta = extrapolate(hats[-1], hats[-2], alpha)["w"]
    return cap + 1


def test_apo_needs_fewer_iterations_on_a_bandit():
    dpo = [_bandit_iterations(s, 0.0) for s in range(20)]
    apo = [_bandit_iterations(s, 0.3) for s in range(20)]
    not_slower = sum(a <= d for a, d in zip(apo, dpo))
    assert not_slower >= 18, (dpo, apo)
    assert sum(apo) <= 0.9 * sum(dpo), (sum(apo) / 20, sum(dpo) / 20)
