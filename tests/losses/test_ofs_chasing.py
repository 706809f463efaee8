"""OFS-DPO's chasing term: the gradient identity of the spec, its stop-gradients, and the role-swap rule."""

import pytest
import torch
import torch.nn.functional as F

from preflab.ofs.chasing import RoleState, chasing_term


def _loss(h_f, h_s, alpha):
    dpo = -F.logsigmoid(h_f).mean() - F.logsigmoid(h_s).mean()
    term, metrics = chasing_term(h_f, h_s, alpha)
    return dpo + term, metrics


def test_gradients_follow_the_identity():
    torch.manual_seed(0)
    n, alpha = 7, 0.3
    h_f = torch.randn(n, dtype=torch.float64, requires_grad=True)
    h_s = torch.randn(n, dtype=torch.float64, requires_grad=True)
    loss, metrics = _loss(h_f, h_s, alpha)
    loss.backward()
    push = torch.sigmoid(h_s - h_f).detach()
    torch.testing.assert_close(h_f.grad, -(torch.sigmoid(-h_f.detach()) + alpha * push) / n, atol=1e-12, rtol=0)
    torch.testing.assert_close(h_s.grad, -(torch.sigmoid(-h_s.detach()) + alpha * push) / n, atol=1e-12, rtol=0)
    assert metrics["push"] == pytest.approx(push.mean().item())
    assert metrics["gap"] == pytest.approx((h_f - h_s).mean().item())


def test_chasing_alone_raises_both_margins_and_the_leader_ignores_the_chasers_dpo_term():
    h_f = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    h_s = torch.tensor([0.1, 0.3, -0.5], requires_grad=True)
    term, _ = chasing_term(h_f, h_s, alpha=1.0)
    term.backward()
    assert (h_f.grad < 0).all() and (h_s.grad < 0).all()  # a descent step raises both margins

    grads = []
    for scale in (1.0, 5.0):
        f, s = h_f.detach().clone().requires_grad_(), h_s.detach().clone().requires_grad_()
        loss = -F.logsigmoid(f).mean() - scale * F.logsigmoid(s).mean() + chasing_term(f, s, 0.5)[0]
        loss.backward()
        grads.append(f.grad)
    assert torch.equal(grads[0], grads[1])


def test_without_stop_gradients_the_terms_cancel_and_the_clamp_bounds_the_gap():
    h_f, h_s = torch.tensor([3.0, -2.0], requires_grad=True), torch.tensor([-4.0, 1.0], requires_grad=True)
    term, _ = chasing_term(h_f, h_s, 0.5, stopgrad=False)
    term.backward()
    assert term.item() == 0 and not h_f.grad.any() and not h_s.grad.any()
    h_f.grad, h_s.grad = None, None
    term, _ = chasing_term(h_f, h_s, 0.5, gap_clamp=1.0)
    term.backward()
    assert not h_f.grad.any() and not h_s.grad.any()  # both gaps (7, −3) lie outside ±1: clamped, no gradient
    grads = []
    for clamp in (None, 10.0):  # gaps within ±10: the clamp changes nothing
        h_f.grad, h_s.grad = None, None
        chasing_term(h_f, h_s, 0.5, gap_clamp=clamp)[0].backward()
        grads.append((h_f.grad.clone(), h_s.grad.clone()))
    assert grads[0][0].abs().min() > 0 and all(torch.equal(a, b) for a, b in zip(*grads))


def test_roles_change_only_at_window_boundaries_after_the_means_cross():
    roles = RoleState(interval=3)
    script = [(0.60, 0.70), (0.50, 0.40), (0.50, 0.40),  # window 1: slow's mean is lower
              (0.30, 0.90), (0.30, 0.90), (0.30, 0.10),  # window 2: fast lower → back to fast
              (0.40, 0.40), (0.40, 0.40), (0.40, 0.40)]  # window 3: a tie goes to fast
    leaders, flips = [], []
    for step, (f, s) in enumerate(script, start=1):
        flips.append(roles.step(step, f, s))
        leaders.append(roles.leader)
    assert leaders == ["fast", "fast", "slow", "slow", "slow", "fast", "fast", "fast", "fast"]
    assert flips == [False, False, True, False, False, True, False, False, False]
    assert roles.swaps == 2 and roles.chaser == "slow"

    assert not roles.decide() and roles.swaps == 2  # an empty window decides nothing
    restored = RoleState(interval=1)
    roles.add(0.9, 0.1)
    restored.load_state_dict(roles.state_dict())
    assert restored.state_dict() == roles.state_dict()
    assert restored.decide() and restored.leader == "slow"  # a final check includes the last partial window
