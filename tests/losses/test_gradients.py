"""T2 and T3 of the spec: the gradient ratio of DPO in probability space, and Flex ≡ DPO at equal betas."""

import pytest
import torch
from torch.testing import assert_close

from preflab.losses import PairLogps, build_objective


def _grads(name, pi_c, pi_r, **hp):
    pi_c = pi_c.clone().requires_grad_(True)
    pi_r = pi_r.clone().requires_grad_(True)
    ref = torch.full_like(pi_c, -3.0)
    tokens = torch.full_like(pi_c, 4.0)
    terms = [{"name": name, **hp.get("main", {})}] + hp.get("extra", [])
    out = build_objective(terms)(PairLogps(pi_c.log(), pi_r.log(), ref, ref, tokens, tokens))
    out.losses.sum().backward()
    return pi_c.grad, pi_r.grad


@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5])
def test_sigmoid_gradient_ratio_is_minus_pi_chosen_over_pi_rejected(beta):
    gen = torch.Generator().manual_seed(0)
    pi_c = torch.rand(64, generator=gen, dtype=torch.float64) * 0.5 + 1e-6
    pi_r = torch.rand(64, generator=gen, dtype=torch.float64) * 0.5 + 1e-6
    g_c, g_r = _grads("sigmoid", pi_c, pi_r, main={"beta": beta})
    assert_close(g_r / g_c, -pi_c / pi_r, rtol=1e-6, atol=0)


def test_flex_gradient_ratio_carries_the_beta_ratio():
    gen = torch.Generator().manual_seed(1)
    pi_c = torch.rand(64, generator=gen, dtype=torch.float64) * 0.5 + 1e-6
    pi_r = torch.rand(64, generator=gen, dtype=torch.float64) * 0.5 + 1e-6
    g_c, g_r = _grads("flex", pi_c, pi_r, main={"beta_chosen": 0.1, "beta_rejected": 0.05})
    assert_close(g_r / g_c, -(0.05 / 0.1) * pi_c / pi_r, rtol=1e-6, atol=0)


def test_log_space_gradients_are_symmetric_fixture_a():
    """∂ℓ/∂logπ⁺ = −∂ℓ/∂logπ⁻ = −β·σ(−βh); fixture A (h = 2, β = 0.1): −0.0450166."""
    lc = torch.tensor([-10.0], dtype=torch.float64, requires_grad=True)
    lr = torch.tensor([-12.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-11.0], dtype=torch.float64)
    n = torch.tensor([5.0], dtype=torch.float64)
    build_objective([{"name": "sigmoid"}])(PairLogps(lc, lr, ref, ref, n, n)).losses.sum().backward()
    assert lc.grad.item() == pytest.approx(-0.0450166, abs=1e-7)
    assert lr.grad.item() == pytest.approx(0.0450166, abs=1e-7)


def test_sft_term_adds_minus_gamma_over_pi_chosen():
    gen = torch.Generator().manual_seed(2)
    pi_c = torch.rand(16, generator=gen, dtype=torch.float64) * 0.5 + 1e-6
    pi_r = torch.rand(16, generator=gen, dtype=torch.float64) * 0.5 + 1e-6
    gamma = 0.3
    g_plain, _ = _grads("sigmoid", pi_c, pi_r)
    g_sft, _ = _grads("sigmoid", pi_c, pi_r, extra=[{"name": "sft", "weight": gamma, "normalize": "sum"}])
    assert_close(g_sft - g_plain, -gamma / pi_c, rtol=1e-6, atol=1e-12)


def test_flex_with_equal_betas_is_dpo():
    gen = torch.Generator().manual_seed(3)
    vals = [(-torch.rand(32, generator=gen, dtype=torch.float64) * 50).requires_grad_(True) for _ in range(2)]
    ref = [-torch.rand(32, generator=gen, dtype=torch.float64) * 50 for _ in range(2)]
    n = torch.full((32,), 7.0, dtype=torch.float64)
    results = []
    for terms in ([{"name": "sigmoid", "beta": 0.2}], [{"name": "flex", "beta_chosen": 0.2, "beta_rejected": 0.2}]):
        out = build_objective(terms)(PairLogps(vals[0], vals[1], ref[0], ref[1], n, n))
        grads = torch.autograd.grad(out.losses.sum(), vals)
        results.append((out.losses.detach(), out.chosen_rewards, out.rejected_rewards, *grads))
    for a, b in zip(*results):
        assert_close(a, b, atol=1e-12, rtol=0)
