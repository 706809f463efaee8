"""COFS-DPO's combination of LoRA modules is exact on the products; naive factor averaging is not."""

import pytest
import torch

from preflab.ofs.combine import LoraAtom, concat_lora, naive_factor_average, project_simplex, simplex_grid


def _atoms():
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 0.5), (8, 2.0), (2, 1.0)]  # rank, scale
    return [LoraAtom(torch.randn(r, 12, generator=g, dtype=torch.float64),
                     torch.randn(10, r, generator=g, dtype=torch.float64), s) for r, s in shapes]


def test_concatenation_is_the_weighted_sum_of_products():
    atoms = _atoms()
    coeffs = [0.2, 0.5, 0.3]
    A, B = concat_lora(atoms, coeffs)
    assert A.shape == (14, 12) and B.shape == (10, 14)
    torch.testing.assert_close(B @ A, sum(c * a.delta() for a, c in zip(atoms, coeffs)), atol=1e-12, rtol=0)


def test_weights_one_zero_give_the_first_module_and_factor_averaging_is_wrong():
    atoms = _atoms()[:2]
    A, B = concat_lora(atoms, [1.0, 0.0])
    assert torch.equal(A, atoms[0].A) and torch.equal(B, atoms[0].scale * atoms[0].B)
    torch.testing.assert_close(B @ A, atoms[0].delta(), atol=1e-12, rtol=0)
    same_rank = [atoms[0], LoraAtom(atoms[1].A[:4], atoms[1].B[:, :4], atoms[1].scale)]
    exact = 0.5 * same_rank[0].delta() + 0.5 * same_rank[1].delta()
    naive = naive_factor_average(same_rank, [0.5, 0.5])
    assert (naive - exact).norm() / exact.norm() > 1e-3
    A, B = concat_lora(same_rank, [0.5, 0.5])
    torch.testing.assert_close(B @ A, exact, atol=1e-12, rtol=0)


def test_simplex_projection_and_grid():
    third = torch.full((3,), 1 / 3, dtype=torch.float64)
    torch.testing.assert_close(project_simplex(torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64)), third)
    torch.testing.assert_close(project_simplex(torch.tensor([2.0, 0.0])), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(project_simplex(torch.tensor([0.3, 0.7])), torch.tensor([0.3, 0.7]))
    w = project_simplex(torch.tensor([-1.0, 0.2, 3.0, 0.9]))
    assert w.min() >= 0 and w.sum().item() == pytest.approx(1.0)
    assert len(simplex_grid(2, 0.1)) == 11 and len(simplex_grid(3, 0.1)) == 66
    assert all(sum(w) == pytest.approx(1.0) for w in simplex_grid(3, 0.1))
    with pytest.raises(ValueError, match="divide 1"):
        simplex_grid(2, 0.3)


def test_every_weight_zero_gives_rank_zero_factors_and_a_count_mismatch_is_refused():
    atoms = _atoms()
    A, B = concat_lora(atoms, [0.0, 0.0, 0.0])
    assert A.shape == (0, 12) and B.shape == (10, 0)
    assert A.dtype == B.dtype == torch.float64
    assert torch.equal(B @ A, torch.zeros(10, 12, dtype=torch.float64))
    A, B = concat_lora(atoms[:1], [0.0])  # one module of weight 0
    assert A.shape == (0, 12) and B.shape == (10, 0)
    with pytest.raises(ValueError, match="3 modules but 2 weights"):
        concat_lora(atoms, [0.5, 0.5])


def test_naive_factor_average_by_hand():
    """A = ½(A₁ + A₂) = [[½, ½], [½, ½]]; B = ½·1·B₁ + ½·2·I = [[3/2, 1], [3/2, 3]]; B·A = [[5/4, 5/4], [9/4, 9/4]],
    while the exact ½ΔW₁ + ½ΔW₂ = ½B₁ + I·A₂ = [[½, 1], [3/2, 2]] + [[0, 1], [1, 0]]."""
    eye = torch.eye(2, dtype=torch.float64)
    swap = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    b1 = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    atoms = [LoraAtom(eye, b1, 1.0), LoraAtom(swap, eye, 2.0)]
    torch.testing.assert_close(naive_factor_average(atoms, [0.5, 0.5]),
                               torch.tensor([[1.25, 1.25], [2.25, 2.25]], dtype=torch.float64), atol=1e-12, rtol=0)
    A, B = concat_lora(atoms, [0.5, 0.5])
    torch.testing.assert_close(B @ A, torch.tensor([[0.5, 2.0], [2.5, 2.0]], dtype=torch.float64), atol=1e-12, rtol=0)
