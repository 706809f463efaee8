"""LD-DPO (``ld_alpha``, any objective's setting) on a hand-worked pair.

Pair P: |y⁺| = 3, |y⁻| = 5 tokens, so the shared length is 3 and only the rejected response has an excess.
Policy: chosen −6 (all shared), rejected −9 = −5 (its first 3 tokens) + −4 (excess).
Reference: chosen −7, rejected −8 = −5 + −3.
LD log-prob = shared + α·excess: rejected −5 − 4α (policy), −5 − 3α (reference); chosen unchanged.
sigmoid, β 0.1, L(x) = −log σ(x): ρ⁺ = 1, ρ⁻ = −α, h = 1 + α:
  α 0 → L(0.1) = 0.644397; α 0.5 → L(0.15) = 0.620957; α 1 (plain DPO) → L(0.2) = 0.598139.
simpo, β 2, γ 1 (per-token: the counts stay 3 and 5): l̄⁺ = −2, l̄⁻ = (−5 − 4α)/5:
  α 0 → L(2·(−2 + 1) − 1) = L(−3) = 3.048587; α 0.5 → L(−2.2) = 2.305083; α 1 → L(−1.4) = 1.620417.
Pair Q (equal lengths, 4 and 4: shared = whole): policy −4 / −5, reference −4.5 / −4.5: any α leaves it as it is.
"""

import pytest
import torch
from torch.testing import assert_close

from preflab.losses import PairLogps, build_objective

F64 = torch.float64


def _pairs(shared: bool = True, reference: bool = True) -> PairLogps:
    t = lambda *v: torch.tensor(v, dtype=F64)
    ref = (t(-7.0, -4.5), t(-8.0, -4.5)) if reference else (None, None)
    policy_shared = (t(-6.0, -4.0), t(-5.0, -5.0)) if shared else (None, None)
    ref_shared = (t(-7.0, -4.5), t(-5.0, -4.5)) if shared and reference else (None, None)
    return PairLogps(t(-6.0, -4.0), t(-9.0, -5.0), *ref, t(3.0, 4.0), t(5.0, 4.0), *policy_shared, *ref_shared)


@pytest.mark.parametrize("alpha,want", [(0.0, 0.644397), (0.5, 0.620957), (1.0, 0.598139), (None, 0.598139)])
def test_sigmoid_weights_the_excess_by_alpha(alpha, want):
    plain = build_objective([{"name": "sigmoid"}])(_pairs()).losses
    out = build_objective([{"name": "sigmoid", "ld_alpha": alpha}])(_pairs())
    assert_close(out.losses[0].item(), want, atol=1e-6, rtol=0)
    assert_close(out.losses[1], plain[1], atol=1e-12, rtol=0)  # equal lengths: unchanged
    assert_close(out.margin[0].item(), 1 + (1.0 if alpha is None else alpha), atol=1e-12, rtol=0)


@pytest.mark.parametrize("alpha,want", [(0.0, 3.048587), (0.5, 2.305083), (1.0, 1.620417)])
def test_reference_free_objectives_take_it_without_reference(alpha, want):
    """SimPO needs no reference: its shared-length parts are not asked for."""
    out = build_objective([{"name": "simpo", "beta": 2.0, "gamma": 1.0, "ld_alpha": alpha}])(_pairs(reference=False))
    assert_close(out.losses[0].item(), want, atol=1e-6, rtol=0)


def test_each_term_applies_its_own_alpha():
    """Terms of a weighted sum read the log-probs their own way: α 0 on the first, off on the second."""
    out = build_objective([{"name": "sigmoid", "ld_alpha": 0.0}, {"name": "sigmoid", "weight": 2.0}])(_pairs())
    assert_close(out.losses[0].item(), 0.644397 + 2 * 0.598139, atol=1e-6, rtol=0)
    assert_close(out.margin[0].item(), 1.0, atol=1e-12, rtol=0)  # the first term's margin, α 0


def test_missing_shared_parts_are_refused_naming_what_is_missing():
    objective = build_objective([{"name": "sigmoid", "ld_alpha": 0.5}])
    with pytest.raises(ValueError, match="^ld_alpha needs the log-probs of the pairs' shared length, which this "
                                         "scorer did not give$"):
        objective(_pairs(shared=False))
    fields = list(vars(_pairs()).values())
    with pytest.raises(ValueError, match="^ld_alpha needs the log-probs"):  # one side missing is enough
        objective(PairLogps(*fields[:7], None, *fields[8:]))
    with pytest.raises(ValueError, match="^ld_alpha needs the reference's log-probs of the pairs' shared length, "
                                         "not given here$"):
        objective(PairLogps(*fields[:8], None, None))
    assert build_objective([{"name": "sigmoid"}])(_pairs(shared=False)).losses.shape == (2,)  # off: not needed


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_alpha_outside_the_unit_interval_is_refused(bad):
    with pytest.raises(ValueError, match=r"ld_alpha: must be in \[0, 1\]"):
        build_objective([{"name": "sigmoid", "ld_alpha": bad}])
    build_objective([{"name": "sigmoid", "ld_alpha": 0.0}])  # both ends are allowed
    build_objective([{"name": "sigmoid", "ld_alpha": 1.0}])


def test_of_batch_splits_chosen_then_rejected():
    logps, counts, shared = torch.arange(4.0), torch.tensor([3.0, 4, 5, 4]), torch.arange(4.0) - 10
    ref, ref_shared = torch.arange(4.0) + 10, torch.arange(4.0) + 20
    pair = PairLogps.of_batch(2, (logps, counts, shared), (ref, ref_shared))
    assert [t.tolist() for t in vars(pair).values()] == [
        [0, 1], [2, 3], [10, 11], [12, 13], [3, 4], [5, 4], [-10, -9], [-8, -7], [20, 21], [22, 23]]
    free = PairLogps.of_batch(2, (logps, counts, None))
    assert free.ref_chosen is None and free.ref_rejected is None and free.policy_chosen_shared is None
