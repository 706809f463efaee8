"""OnDARE / OnTIES beyond the default path: option bounds, top-k edge cases, the α schedule, step-K values against
Algorithm 2 written out here, the closure, tensors without gradients, and the guards' messages."""

import math

import pytest
import torch

from preflab.optim import OnDAREAdamW, OnTIESAdamW, task_vectors_by_name, ties_merge, topk_mask
from preflab.optim.merging import MergingOptions

F64 = torch.float64


@pytest.mark.parametrize("field,value,ok", [("reserve_p", 0.0, False), ("reserve_p", 1.0, True),
                                            ("reserve_p", 1.5, False), ("alpha", 1.0, True), ("alpha", 1.5, False),
                                            ("alpha", -0.1, False), ("online_step", 0, False), ("clip", 0.0, False),
                                            ("clip", 1e-6, True)])
def test_option_bounds_name_the_field(field, value, ok):
    if ok:
        assert getattr(MergingOptions(**{field: value}), field) == value
    else:
        with pytest.raises(ValueError, match=f"^{field}: must be"):
            MergingOptions(**{field: value})


def test_topk_mask_edge_cases():
    values = torch.tensor([0.3, -0.9, 0.1, 0.5], dtype=F64)
    assert topk_mask(values, 0.2).tolist() == [True] * 4  # k = 0 < 1: no trimming
    assert topk_mask(values, 1.5).tolist() == [True] * 4  # p ≥ 1: no trimming
    assert topk_mask(values, 0.25).tolist() == [False, True, False, False]  # k = 1: the largest |value|
    assert topk_mask(values, 0.75).tolist() == [True, True, False, True]  # k = numel − 1
    ties = topk_mask(torch.tensor([1.0, -1.0, 1.0, 0.0]), 0.5)  # three tied at the threshold: exactly k kept
    assert int(ties.sum()) == 2 and not ties[3]
    for mask in (topk_mask(values, 1.0), topk_mask(values, 0.5), ties):
        assert mask.dtype == torch.bool
    close = torch.tensor([1.0, 1.0 + 1e-12, 0.5], dtype=F64)  # fp64 values that fp32 cannot tell apart
    assert topk_mask(close, 0.34).tolist() == [False, True, False]
    half = torch.tensor([0.3, -0.9, 0.1, 0.5], dtype=torch.bfloat16)
    assert topk_mask(half, 0.5).tolist() == [False, True, False, True]


def test_weighted_election_by_hand_and_its_tie():
    tau = torch.tensor([0.010, -0.005, 1e-5, -1e-5, 0.0, -0.001], dtype=F64)
    delta = torch.tensor([0.001, 0.001, 0.001, -0.001, 0.001, 0.001], dtype=F64)
    # a = 0.9δ, b = 0.1τ: agreeing signs add, else the larger magnitude wins (zeros agree with anything)
    expected = torch.tensor([0.0019, 0.0009, 0.000901, -0.000901, 0.0009, 0.0009], dtype=F64)
    torch.testing.assert_close(ties_merge(tau, delta, 0.1, "weighted"), expected, atol=1e-15, rtol=0)
    # |a| = |b| with opposite signs: the step is kept
    tie = ties_merge(torch.tensor([-0.2], dtype=F64), torch.tensor([0.2], dtype=F64), 0.5, "weighted")
    assert tie.tolist() == [0.1]
    with pytest.raises(ValueError, match="ties_election: expected unweighted or weighted"):
        ties_merge(tau, delta, 0.1, "majority")


def test_defaults_and_task_vector_bytes():
    params = [torch.nn.Parameter(torch.zeros(5, 4, dtype=F64)), torch.nn.Parameter(torch.zeros(3, dtype=F64)),
              torch.nn.Parameter(torch.zeros(7, dtype=F64))]  # the last one without a task vector
    opt = OnDAREAdamW(params, {params[0]: torch.ones(5, 4, dtype=F64), params[1]: torch.ones(3, dtype=F64)})
    assert opt.defaults["lr"] == 1e-6 and opt.defaults["eps"] == 1e-8 and opt.options == MergingOptions()
    assert opt.task_vector_bytes() == (20 + 3) * 8
    assert opt.generator.device == params[0].device


def test_the_task_vector_takes_the_parameters_dtype_and_the_guards_say_what_and_where():
    param = torch.nn.Parameter(torch.zeros(3, dtype=F64))
    opt = OnDAREAdamW([param], {param: torch.full((3,), 0.5, dtype=torch.float32)}, reserve_p=1.0)
    assert opt.state[param]["tau"].dtype == F64
    with pytest.raises(ValueError, match=r"^task vector of a parameter: shape \(2,\) != parameter \(3,\)$"):
        OnDAREAdamW([param], {param: torch.zeros(2)})
    with pytest.raises(ValueError, match="^a parameter is torch.bfloat16: online merging needs fp32"):
        half = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
        OnDAREAdamW([half], {half: torch.zeros(3)})
    with pytest.raises(ValueError, match="^task_vectors: a tensor with a task vector is not among the optimized"):
        OnDAREAdamW([param], {torch.nn.Parameter(torch.zeros(3)): torch.zeros(3)})


def test_task_vectors_by_name_skips_frozen_and_unknown_tensors_and_checks_every_shape():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    model[0].weight.requires_grad_(False)
    names = [n for n, _ in model.named_parameters()]  # 0.weight (frozen), 0.bias, 1.weight, 1.bias
    sft = {n: torch.ones_like(p) for n, p in model.named_parameters() if n != "1.weight"}  # 1.weight unknown
    base = {n: torch.zeros_like(t) for n, t in sft.items()}
    taus = task_vectors_by_name(model.named_parameters(), base, sft)
    assert {id(p) for p in taus} == {id(model[0].bias), id(model[1].bias)} and names[0] == "0.weight"
    with pytest.raises(ValueError, match="0.bias has shapes base"):
        task_vectors_by_name(model.named_parameters(), {**base, "0.bias": torch.zeros(5)}, sft)


def test_alpha_schedule_lr_ratio_scales_the_merge_weight_with_the_learning_rate():
    """α_t = α·lr_t/lr_0; with a zero gradient (δ = 0) and p = 1 each step adds α_t·τ."""
    tau = torch.full((4,), 0.5, dtype=F64)
    for schedule, factors in (("lr_ratio", [1.0, 0.5, 0.25]), ("constant", [1.0, 1.0, 1.0])):
        param = torch.nn.Parameter(torch.zeros(4, dtype=F64))
        opt = OnDAREAdamW([param], {param: tau}, lr=1e-3, reserve_p=1.0, alpha=0.1, alpha_schedule=schedule)
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
        before = 0.0
        for factor in factors:
            param.grad = torch.zeros_like(param)
            opt.step()
            scheduler.step()
            torch.testing.assert_close(param.detach() - before, 0.1 * factor * tau, atol=1e-15, rtol=0)
            before = param.detach().clone()
    param = torch.nn.Parameter(torch.zeros(4, dtype=F64))  # no scheduler: no initial_lr, α itself
    opt = OnDAREAdamW([param], {param: tau}, lr=1e-3, reserve_p=1.0, alpha=0.1, alpha_schedule="lr_ratio")
    param.grad = torch.zeros_like(param)
    opt.step()
    torch.testing.assert_close(param.detach(), 0.1 * tau, atol=1e-15, rtol=0)


def test_step_returns_the_closures_loss_and_passes_over_tensors_without_a_gradient():
    first, second = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = OnTIESAdamW([first, second], None, lr=1e-2)
    second.grad = torch.ones(2)
    assert opt.step() is None
    assert torch.equal(first, torch.zeros(2)) and (second < 0).all()  # first had no gradient; second still moved
    assert opt.step(lambda: torch.tensor(3.0)).item() == 3.0


def test_a_state_dict_without_the_mask_generator_still_loads():
    param = torch.nn.Parameter(torch.zeros(3))
    opt = OnDAREAdamW([param], {param: torch.ones(3)}, reserve_p=0.5)
    state = opt.state_dict()
    state.pop("merging_generator")
    OnDAREAdamW([param], None, reserve_p=0.5).load_state_dict(state)


def _algorithm_2(kind, theta, grads, tau_tilde, masks, alpha, p, k, wd, lr=1e-2):
    """Step-K (the paper's Algorithm 2 as the spec fixes it, §5): every t not a multiple of K takes the plain Adam
    step and caches it; at t = K, 2K, … the cache is rolled back and merged with this step; weight decay every step."""
    theta, m, v, cache, out = theta.clone(), torch.zeros_like(theta), torch.zeros_like(theta), 0 * theta, []
    for t, g in enumerate(grads, start=1):
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        d = -lr * math.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t) * m / (v.sqrt() + 1e-8)
        if t % k:
            theta, cache = theta + d, cache + d
        else:
            theta, d, cache = theta - cache, d + cache, 0 * cache
            if kind == "dare":
                update = alpha * tau_tilde + (1 - alpha) * (masks.pop(0) * d) / p
            else:
                update = ties_merge(tau_tilde, d * topk_mask(d, p), alpha)
            theta = theta + update
        theta = theta * (1 - lr * wd)
        out.append(theta)
    return out


@pytest.mark.parametrize("kind", ["dare", "ties"])
@pytest.mark.parametrize("k", [2, 3])
def test_step_k_values_follow_algorithm_2(kind, k):
    p, alpha, wd, steps = 0.5, 0.2, 0.01, 7
    gen = torch.Generator().manual_seed(5)
    start = torch.randn(6, generator=gen, dtype=F64)
    tau = 0.05 * torch.randn(6, generator=gen, dtype=F64)
    grads = [torch.randn(6, generator=gen, dtype=F64) for _ in range(steps)]
    masks = [torch.rand(6, generator=gen, dtype=F64) < p for _ in range(steps + 1)]
    param = torch.nn.Parameter(start.clone())
    cls = OnDAREAdamW if kind == "dare" else OnTIESAdamW
    opt = cls.__new__(cls)
    drawn = iter(masks)
    opt._draw_mask = lambda like, prob: next(drawn)
    cls.__init__(opt, [param], {param: tau}, lr=1e-2, weight_decay=wd, reserve_p=p, alpha=alpha, online_step=k)
    tau_tilde = opt.state[param]["tau"].clone()
    expected = _algorithm_2(kind, start, grads, tau_tilde, masks[1:], alpha, p, k, wd)
    for g, want in zip(grads, expected):
        param.grad = g.clone()
        opt.step()
        torch.testing.assert_close(param.detach(), want, atol=1e-12, rtol=0)


def test_no_step_cache_without_step_k():
    param = torch.nn.Parameter(torch.zeros(3))
    opt = OnDAREAdamW([param], {param: torch.ones(3)}, reserve_p=0.5, online_step=1)
    param.grad = torch.ones(3)
    opt.step()
    assert "delta_cache" not in opt.state[param]


def test_the_l1_rescale_applies_from_an_l1_norm_of_exactly_1e_8():
    """The reference rescales when ‖x‖₁ ≥ 1e-8 (2·fl(5e-9) = fl(1e-8) exactly)."""
    values = torch.tensor([5e-9, 5e-9, 0.0, 0.0], dtype=F64)
    param = torch.nn.Parameter(torch.zeros(4, dtype=F64))
    ties = OnTIESAdamW([param], {param: values}, reserve_p=0.25, rescale="l1")
    kept = ties.state[param]["tau"]  # one of the two tied coordinates, scaled ×2 to the L1 norm 1e-8
    assert int((kept != 0).sum()) == 1 and kept.sum().item() == 1e-8
    dare = OnDAREAdamW.__new__(OnDAREAdamW)
    dare._draw_mask = lambda like, prob: torch.tensor([True, True, False, False])
    OnDAREAdamW.__init__(dare, [param], None, reserve_p=0.25, rescale="l1", eps=0.0)
    assert dare._merge(torch.zeros(4, dtype=F64), values, 0.0, 0.0).tolist() == [5e-9, 5e-9, 0.0, 0.0]  # 4δ → ‖δ‖₁
