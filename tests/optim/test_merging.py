"""OnDARE / OnTIES: reduce to AdamW, follow the spec's rules (re-implemented here), elect signs, resume bitwise."""

import copy
import math

import pytest
import torch

from preflab.optim import OnDAREAdamW, OnTIESAdamW, task_vectors_by_name, ties_merge, topk_mask

F64 = torch.float64


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(5, 4, generator=g, dtype=F64)),
            torch.nn.Parameter(torch.randn(6, generator=g, dtype=F64))]


def _grads(steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(5, 4, generator=g, dtype=F64), torch.randn(6, generator=g, dtype=F64)] for _ in range(steps)]


def _taus(seed=2):
    g = torch.Generator().manual_seed(seed)
    return [0.05 * torch.randn(5, 4, generator=g, dtype=F64), 0.05 * torch.randn(6, generator=g, dtype=F64)]


def _run(optimizer, params, grads):
    history = []
    for step_grads in grads:
        for p, grad in zip(params, step_grads):
            p.grad = grad.clone()
        optimizer.step()
        history.append([p.detach().clone() for p in params])
    return history


def _reference_adamw(params, grads, lr, betas, eps, wd):
    """AdamW in the reference formulation (ε on the uncorrected √v, decay after the update), by hand."""
    theta = [p.detach().clone() for p in params]
    m = [torch.zeros_like(t) for t in theta]
    v = [torch.zeros_like(t) for t in theta]
    history = []
    for t, step_grads in enumerate(grads, start=1):
        for i, g in enumerate(step_grads):
            m[i] = betas[0] * m[i] + (1 - betas[0]) * g
            v[i] = betas[1] * v[i] + (1 - betas[1]) * g * g
            delta = -lr * math.sqrt(1 - betas[1] ** t) / (1 - betas[0] ** t) * m[i] / (v[i].sqrt() + eps)
            theta[i] = (theta[i] + delta) * (1 - lr * wd)
        history.append([x.clone() for x in theta])
    return history


@pytest.mark.parametrize("k", [1, 3])
def test_ondare_with_alpha_zero_and_p_one_is_adamw(k):
    """Bitwise equal to the same class's plain AdamW path (K = 1), and to AdamW written by hand (1e-12)."""
    params, grads = _params(), _grads(20)
    opt = OnDAREAdamW(params, dict(zip(params, _taus())), lr=1e-2, weight_decay=0.1, reserve_p=1.0, alpha=0.0,
                      online_step=k)
    ours = _run(opt, params, grads)
    plain_params = _params()
    plain = _run(OnDAREAdamW(plain_params, None, lr=1e-2, weight_decay=0.1), plain_params, grads)
    by_hand = _reference_adamw(_params(), grads, 1e-2, (0.9, 0.999), 1e-8, 0.1)
    for a, b, c in zip(ours, plain, by_hand):
        for x, y, z in zip(a, b, c):
            if k == 1:
                assert torch.equal(x, y)
            torch.testing.assert_close(x, y, atol=1e-12, rtol=0)
            torch.testing.assert_close(x, z, atol=1e-12, rtol=0)


def test_torch_formulation_matches_torch_adamw():
    params, grads = _params(), _grads(20)
    opt = OnTIESAdamW(params, {p: torch.zeros_like(p) for p in params}, lr=1e-2, weight_decay=0.1,
                      reserve_p=1.0, alpha=0.0, adam_formulation="torch")
    ours = _run(opt, params, grads)
    ref_params = _params()
    theirs = _run(torch.optim.AdamW(ref_params, lr=1e-2, weight_decay=0.1, foreach=False), ref_params, grads)
    for a, b in zip(ours, theirs):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, atol=1e-12, rtol=0)


def test_onties_reduces_to_adamw_with_the_weighted_election_but_the_default_drops_opposing_coordinates():
    grads = _grads(20)
    expected = _reference_adamw(_params(), grads, 1e-2, (0.9, 0.999), 1e-8, 0.0)
    params = _params()
    weighted = OnTIESAdamW(params, dict(zip(params, _taus())), lr=1e-2, reserve_p=1.0, alpha=0.0,
                           ties_election="weighted")
    for a, b in zip(_run(weighted, params, grads), expected):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, atol=1e-12, rtol=0)
    # default election, α = 0: a coordinate whose larger τ̃ opposes the step is vetoed
    tau, delta = torch.tensor([0.5, -0.5, 0.0], dtype=F64), torch.tensor([0.01, 0.01, 0.01], dtype=F64)
    assert ties_merge(tau, delta, 0.0).tolist() == [0.01, 0.0, 0.01]


def test_ondare_structure():
    p = 0.3
    params = [torch.nn.Parameter(torch.zeros(200, 50, dtype=F64))]
    tau = torch.linspace(-1, 1, 10_000, dtype=F64).view(200, 50)
    opt = OnDAREAdamW(params, {params[0]: tau}, lr=1e-3, reserve_p=p, alpha=0.2)
    tau_tilde = opt.state[params[0]]["tau"].clone()
    kept = tau_tilde != 0
    assert torch.equal(tau_tilde[kept], (tau[kept] / p).clamp(-1, 1))
    assert (tau_tilde[kept & (tau.abs() / p > 1)].abs() == 1).all()  # clamped to ±c
    masks = []
    original = opt._draw_mask

    def record(like, prob):
        mask = original(like, prob)
        masks.append(mask.clone())
        return mask

    opt._draw_mask = record
    for _ in range(10):
        before = params[0].detach().clone()
        params[0].grad = torch.randn_like(params[0])
        state = opt.state[params[0]]
        m_prev = state["exp_avg"].clone() if "exp_avg" in state else torch.zeros_like(before)
        v_prev = state["exp_avg_sq"].clone() if "exp_avg_sq" in state else torch.zeros_like(before)
        t = state.get("step", 0) + 1
        g = params[0].grad
        m = 0.9 * m_prev + 0.1 * g
        v = 0.999 * v_prev + 0.001 * g * g
        delta = -1e-3 * math.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t) * m / (v.sqrt() + 1e-8)
        opt.step()
        expected = before + (0.2 * tau_tilde + 0.8 * (masks[-1] * delta) / p)
        torch.testing.assert_close(params[0].detach(), expected, atol=1e-15, rtol=0)
    assert torch.equal(opt.state[params[0]]["tau"], tau_tilde)  # τ̃ drawn once
    assert not torch.equal(masks[0], masks[1])  # fresh step masks
    n = masks[0].numel()
    for mask in masks:
        assert abs(mask.double().mean().item() - p) <= 4 * math.sqrt(p * (1 - p) / n)


def test_onties_by_hand():
    tau = torch.tensor([0.010, -0.005, 1e-5, -1e-5, 0.0, -0.001], dtype=F64)
    delta = torch.tensor([0.001, 0.001, 0.001, -0.001, 0.001, 0.001], dtype=F64)
    expected = torch.tensor([0.0019, -0.0005, 0.000901, -0.000901, 0.0009, 0.0009], dtype=F64)
    torch.testing.assert_close(ties_merge(tau, delta, 0.1), expected, atol=1e-15, rtol=0)
    assert ties_merge(tau, delta, 0.1, "weighted")[1].item() == pytest.approx(0.0009, abs=1e-15)
    # rows 0-4 through step(): lr 1e-3, ε 0, first-step gradients −sign(δ) make δ exactly ±1e-3
    param = torch.nn.Parameter(torch.zeros(5, dtype=F64))
    opt = OnTIESAdamW([param], {param: tau[:5]}, lr=1e-3, eps=0.0, reserve_p=1.0, alpha=0.1)
    param.grad = -torch.sign(delta[:5])
    opt.step()
    torch.testing.assert_close(param.detach(), expected[:5], atol=1e-15, rtol=0)
    # trimming at p = 0.5 keeps the 3 largest |τ|
    trimmed = tau * topk_mask(tau, 0.5)
    assert trimmed.tolist() == [0.010, -0.005, 0.0, 0.0, 0.0, -0.001]


def _l1_back(trimmed, full, eps=0.0, clip=None):
    """The reference's L1 rescale: ``trimmed`` scaled to ``full``'s L1 norm (skipped below 1e-8), then clamped."""
    if full.abs().sum() < 1e-8:
        return trimmed
    out = trimmed * (full.abs().sum() / (trimmed.abs().sum() + eps))
    return out if clip is None else out.clamp(-clip, clip)


def _spec_rule(kind, params, grads, taus, masks, alpha, p, wd, merge, lr=1e-2, rescale=None, eps=1e-8):
    """The spec's update rules (§2-§4) and the reference's rescale flag, written independently of preflab.optim."""
    theta = [x.detach().clone() for x in params]
    m = [torch.zeros_like(x) for x in theta]
    v = [torch.zeros_like(x) for x in theta]
    if kind == "dare":  # τ̃: 1/p and the clamp (none: Eq. 4, no 1/p); the L1 flag never touches τ̃
        tau_t = [(masks[("init", i)] * t / (1 if rescale == "none" else p)).clamp(-1, 1) for i, t in enumerate(taus)]
    else:
        tau_t = [t * topk_mask(t, p) for t in taus]
        if rescale == "l1" and p < 1:
            tau_t = [_l1_back(x, t) for x, t in zip(tau_t, taus)]
    out = []
    for step, step_grads in enumerate(grads, start=1):
        for i, g in enumerate(step_grads):
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.999 * v[i] + 0.001 * g * g
            d = -lr * math.sqrt(1 - 0.999 ** step) / (1 - 0.9 ** step) * m[i] / (v[i].sqrt() + eps)
            if kind == "dare":
                dropped = masks[(step, i)] * d / (1 if rescale == "none" else p)
                if rescale == "l1":
                    dropped = _l1_back(dropped, d, eps, clip=1.0)
                update = alpha * tau_t[i] + (1 - alpha) * dropped if merge else dropped
            else:
                dt = d * topk_mask(d, p)
                if rescale == "l1" and p < 1:
                    dt = _l1_back(dt, d)
                s = torch.where(tau_t[i] + dt >= 0, 1.0, -1.0).to(F64)
                kept = dt * (torch.sign(dt) == s)
                update = alpha * tau_t[i] * (torch.sign(tau_t[i]) == s) + (1 - alpha) * kept if merge else kept
            theta[i] = (theta[i] + update) * (1 - lr * wd)
        out.append([x.clone() for x in theta])
    return out


@pytest.mark.parametrize("kind,rescale", [("dare", None), ("ties", None), ("dare", "l1"), ("ties", "l1"),
                                          ("dare", "none")])
@pytest.mark.parametrize("merge", [True, False])
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_updates_equal_the_spec_rules_computed_independently(kind, rescale, merge, wd):
    p, alpha = 0.5, 0.05
    base, sft = torch.nn.Linear(4, 5).double(), torch.nn.Linear(4, 5).double()
    taus = [sft.weight.detach() - base.weight.detach(), sft.bias.detach() - base.bias.detach()]
    params = [torch.nn.Parameter(torch.randn(5, 4, dtype=F64)), torch.nn.Parameter(torch.randn(5, dtype=F64))]
    start = copy.deepcopy(params)
    grads = [[torch.randn(5, 4, dtype=F64), torch.randn(5, dtype=F64)] for _ in range(7)]
    g = torch.Generator().manual_seed(3)
    masks = {(s, i): torch.rand(x.shape, generator=g, dtype=F64) < p for s in ["init", *range(1, 8)]
             for i, x in enumerate(params)}
    order = iter([masks[("init", 0)], masks[("init", 1)]] + [masks[(s, i)] for s in range(1, 8) for i in (0, 1)])
    cls = OnDAREAdamW if kind == "dare" else OnTIESAdamW
    opt = cls.__new__(cls)
    opt._draw_mask = lambda like, prob: next(order)
    cls.__init__(opt, params, dict(zip(params, taus)), lr=1e-2, weight_decay=wd, reserve_p=p, alpha=alpha,
                 merge=merge, rescale=rescale)
    ours = _run(opt, params, grads)
    expected = _spec_rule(kind, start, grads, taus, masks, alpha, p, wd, merge, rescale=rescale)
    for a, b in zip(ours, expected):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, atol=1e-12, rtol=0)


def test_step_k_merges_exactly_every_k_steps_and_moves_every_tensor_each_call():
    params = _params()
    taus = [torch.full_like(p, 0.5) for p in params]
    opt = OnDAREAdamW(params, dict(zip(params, taus)), lr=1e-2, reserve_p=1.0, alpha=0.01, online_step=3)
    merged_at = []
    original = opt._merge

    def spy(*args):
        merged_at.append(opt.state[params[0]]["step"])
        return original(*args)

    opt._merge = spy
    for step_grads in _grads(7):
        before = [p.detach().clone() for p in params]
        for p, grad in zip(params, step_grads):
            p.grad = grad
        opt.step()
        assert all(not torch.equal(b, p) for b, p in zip(before, params))
    assert sorted(set(merged_at)) == [3, 6] and len(merged_at) == 4  # two tensors, at t = 3 and 6
    assert torch.count_nonzero(opt.state[params[0]]["delta_cache"]) > 0  # step 7 is cached


@pytest.mark.parametrize("cls", [OnDAREAdamW, OnTIESAdamW])
def test_resume_from_a_saved_state_is_bitwise(cls, tmp_path):
    grads = _grads(10)
    params = _params()
    straight = cls(params, dict(zip(params, _taus())), lr=1e-2, reserve_p=0.4, alpha=0.1, online_step=2)
    final = _run(straight, params, grads)[-1]

    params = _params()
    first = cls(params, dict(zip(params, _taus())), lr=1e-2, reserve_p=0.4, alpha=0.1, online_step=2)
    _run(first, params, grads[:5])
    torch.save({"params": [p.detach() for p in params], "optim": first.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt")
    params = [torch.nn.Parameter(t.clone()) for t in saved["params"]]
    resumed = cls(params, None, lr=1e-2, reserve_p=0.4, alpha=0.1, online_step=2, seed=99)
    resumed.load_state_dict(saved["optim"])
    assert "tau" in resumed.state[params[0]]
    for x, y in zip(_run(resumed, params, grads[5:])[-1], final):
        assert torch.equal(x, y)


def test_guards_name_the_tensor():
    half = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="fp32 master weights"):
        OnDAREAdamW([half], {half: torch.zeros(3)})
    OnDAREAdamW([half], {half: torch.zeros(3)}, allow_low_precision_master=True)
    model = torch.nn.Linear(3, 2)
    base = {"weight": torch.zeros(2, 3), "bias": torch.zeros(2)}
    with pytest.raises(ValueError, match="weight has shapes"):
        task_vectors_by_name(model.named_parameters(), base, {"weight": torch.zeros(3, 3), "bias": torch.zeros(2)})
    with pytest.raises(ValueError, match="bias is in the SFT model but not in the base"):
        task_vectors_by_name(model.named_parameters(), {"weight": torch.zeros(2, 3)}, base)
    wrapped = {f"base_model.model.{n}": p for n, p in model.named_parameters()}
    assert len(task_vectors_by_name(wrapped.items(), base, base)) == 2  # wrapper prefixes stripped


def test_l1_rescale_uses_adams_eps_clamps_the_step_and_skips_a_vanishing_step():
    """OnDARE ``rescale: l1``: the kept step M⊙δ/p is scaled by ‖δ‖₁/(‖M⊙δ/p‖₁ + ε) with Adam's ε and clamped to ±c;
    a step with ‖δ‖₁ < 1e-8 keeps M⊙δ/p; τ̃ is clamp(M₀⊙τ/p) whatever the rescale."""
    p = 0.5
    tau = torch.tensor([0.9, -0.9, 0.2, 0.0], dtype=F64)
    masks = iter([torch.tensor([True, True, False, True]), torch.tensor([True, False, True, False]),
                  torch.tensor([True, False, True, False])])
    param = torch.nn.Parameter(torch.zeros(4, dtype=F64))
    opt = OnDAREAdamW.__new__(OnDAREAdamW)
    opt._draw_mask = lambda like, prob: next(masks)
    OnDAREAdamW.__init__(opt, [param], {param: tau}, lr=0.4, eps=0.5, reserve_p=p, alpha=0.0, rescale="l1", clip=0.015)
    assert opt.state[param]["tau"].tolist() == [0.015, -0.015, 0.0, 0.0]  # 1/p, clamp, no L1 rescale of τ̃
    param.grad = torch.tensor([-1.0, 1.0, 2.0, 3.0], dtype=F64)
    opt.step()
    g = param.grad  # first Adam step: m = 0.1·g, √v = √0.001·|g|, ε on the uncorrected √v
    delta = -0.4 * math.sqrt(0.001) / 0.1 * (0.1 * g) / (math.sqrt(0.001) * g.abs() + 0.5)
    kept = torch.tensor([1.0, 0, 1, 0], dtype=F64) * delta / p
    expected = (kept * delta.abs().sum() / (kept.abs().sum() + 0.5)).clamp(-0.015, 0.015)
    torch.testing.assert_close(param.detach(), expected, atol=1e-15, rtol=0)
    assert expected[2] == -0.015 and 0 < expected[0] < 0.015  # the clamp acted on one coordinate, ε on the other
    flipped = torch.nn.Parameter(torch.zeros(4, dtype=F64))  # the mirrored step: the clamp acts at +c
    opt = OnDAREAdamW.__new__(OnDAREAdamW)
    opt._draw_mask = lambda like, prob: torch.tensor([True, False, True, False])
    OnDAREAdamW.__init__(opt, [flipped], {flipped: tau}, lr=0.4, eps=0.5, reserve_p=p, alpha=0.0, rescale="l1",
                         clip=0.015)
    flipped.grad = -g
    opt.step()
    torch.testing.assert_close(flipped.detach(), -expected, atol=1e-15, rtol=0)
    tiny = torch.nn.Parameter(torch.zeros(4, dtype=F64))
    opt = OnDAREAdamW.__new__(OnDAREAdamW)
    opt._draw_mask = lambda like, prob: torch.tensor([True, False, True, False])
    OnDAREAdamW.__init__(opt, [tiny], {tiny: torch.zeros(4, dtype=F64)}, lr=1e-12, reserve_p=p, alpha=0.0,
                         rescale="l1")
    tiny.grad = torch.ones(4, dtype=F64)
    opt.step()  # ‖δ‖₁ = 4e-12 < 1e-8: no rescale, M⊙δ/p
    torch.testing.assert_close(tiny.detach(), torch.tensor([-2e-12, 0, -2e-12, 0], dtype=F64), atol=0, rtol=1e-6)


def test_onties_l1_rescale_follows_the_reference_and_inverse_p_is_refused():
    tau = torch.tensor([0.4, -0.1, 0.05, -0.3], dtype=F64)  # top-2: 0.4, −0.3 → scaled by 0.85/0.7
    param = torch.nn.Parameter(torch.zeros(4, dtype=F64))
    opt = OnTIESAdamW([param], {param: tau}, reserve_p=0.5, rescale="l1")
    torch.testing.assert_close(opt.state[param]["tau"], torch.tensor([0.4, 0, 0, -0.3], dtype=F64) * (0.85 / 0.7),
                               atol=1e-15, rtol=0)
    plain = OnTIESAdamW([param], {param: tau}, reserve_p=0.5)  # default: no rescale (the published default)
    assert plain.state[param]["tau"].tolist() == [0.4, 0.0, 0.0, -0.3]
    whole = OnTIESAdamW([param], {param: tau}, reserve_p=1.0, rescale="l1")  # no trimming, nothing to rescale
    assert torch.equal(whole.state[param]["tau"], tau)
    with pytest.raises(ValueError, match="rescale: OnTIESAdamW takes one of \\['none', 'l1'\\]"):
        OnTIESAdamW([param], {param: tau}, rescale="inverse_p")
    with pytest.raises(ValueError, match="rescale"):
        OnDAREAdamW([param], {param: tau}, rescale="l2")


@pytest.mark.parametrize("cls", [OnDAREAdamW, OnTIESAdamW])
def test_the_task_vector_points_from_the_base_to_the_sft_model(cls):
    """τ = θ_SFT − θ_base, fed to the optimizer by ``task_vectors_by_name``: with a zero gradient (δ = 0), p = 1 and
    α = ½, one step moves the policy (a copy of the SFT model) by ½·τ — away from the base, never towards it."""
    base, sft = torch.nn.Linear(4, 3).double(), torch.nn.Linear(4, 3).double()
    policy = copy.deepcopy(sft)
    named = [(f"base_model.model.{n}", p) for n, p in policy.named_parameters()]
    taus = task_vectors_by_name(named, base.state_dict(), sft.state_dict())
    opt = cls(policy.parameters(), taus, lr=1e-3, reserve_p=1.0, alpha=0.5, clip=10.0)
    for p in policy.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, p in policy.named_parameters():
        want = sft.state_dict()[name] + 0.5 * (sft.state_dict()[name] - base.state_dict()[name])
        torch.testing.assert_close(p.detach(), want, atol=1e-15, rtol=0)
