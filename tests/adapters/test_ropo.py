"""RoPO: starts at the reference bit for bit, stays orthogonal, keeps hyperspherical energy, merges exactly."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_model, sentiment_rows, write_jsonl
from safetensors.torch import load_file
from torch import nn
from torch.testing import assert_close

from preflab.adapters import build_parametrization
from preflab.adapters.ropo import RopoLinear, RopoParams
from preflab.config import load_config
from preflab.eval.energy import hyperspherical_energy
from preflab.models.scorer import SequenceScorer
from preflab.train import train

STRUCTURES = {"block_diagonal": ((4, 1),), "butterfly": ((2, 1), (2, 2), (2, 4), (2, 8)),
              "multi_granularity": ((2, 1), (4, 2), (2, 8))}


def _layer(dtype=torch.float32, structure="butterfly", seed=0, bias=True, scale=0.3, **options) -> RopoLinear:
    torch.manual_seed(seed)
    base = nn.Linear(32, 24, bias=bias, dtype=dtype)
    layer = RopoLinear(base, RopoParams(factors=STRUCTURES[structure], **options)).to(dtype)
    with torch.no_grad():
        for p in layer.rotation:
            p.normal_(0, scale)
        if layer.magnitude is not None:
            layer.magnitude.mul_(torch.empty_like(layer.magnitude).uniform_(0.5, 1.5))
    return layer


def _rotation(layer: RopoLinear) -> torch.Tensor:
    with torch.no_grad():
        return layer.rotate(torch.eye(layer.base.in_features, dtype=layer.rotation[0].dtype))


@pytest.mark.parametrize("structure", list(STRUCTURES))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_rotation_is_orthogonal(structure, dtype, tol):
    r = _rotation(_layer(dtype, structure))
    assert (r.T @ r - torch.eye(32, dtype=dtype)).abs().max() <= tol
    assert (r - torch.eye(32, dtype=dtype)).abs().max() > 0.1  # a real rotation, not the identity


def test_neumann_rotation_is_only_nearly_orthogonal():
    """The truncated series converges for small Q (as near the identity start): close, but not exactly orthogonal."""
    exact = _layer(torch.float64, scale=0.05)
    approx = _layer(torch.float64, scale=0.05, cayley="neumann", neumann_terms=5)
    r_exact, r_approx = _rotation(exact), _rotation(approx)
    error = (r_approx.T @ r_approx - torch.eye(32, dtype=torch.float64)).abs().max()
    assert 1e-12 < error < 1e-4 and (r_exact - r_approx).abs().max() < 1e-4


@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_forward_equals_the_merged_weight_whose_row_norms_are_m(structure):
    layer = _layer(structure=structure)
    x = torch.randn(5, 7, 32)
    merged = layer.merged_weight()
    with torch.no_grad():
        assert_close(layer(x), F.linear(x, merged, layer.base.bias), rtol=1e-5, atol=1e-5)
    assert_close(merged.norm(dim=1), layer.magnitude.detach(), rtol=1e-5, atol=1e-6)


def test_magnitude_options_compute_the_same_function():
    absolute = _layer(torch.float64, magnitude="absolute")
    ratio = absolute.magnitude.detach() / absolute.row_norm
    for options, value in (({"magnitude": "relative"}, ratio), ({"magnitude_param": "log"}, ratio.log())):
        other = _layer(torch.float64, **options)
        with torch.no_grad():
            other.magnitude.copy_(value)
        assert_close(other.merged_weight(), absolute.merged_weight(), rtol=1e-12, atol=1e-12)
    plain_oft = _layer(torch.float64, magnitude="none")
    assert plain_oft.magnitude is None
    assert_close(plain_oft.merged_weight().norm(dim=1), plain_oft.row_norm, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_energy_is_invariant_under_rotation_and_positive_scaling(dtype, tol):
    layer = _layer(dtype, bias=False)
    before = hyperspherical_energy(layer.base.weight)
    after = hyperspherical_energy(layer.merged_weight().to(dtype))
    assert abs(after - before) / before <= tol


def test_energy_moves_under_a_low_rank_update():
    """The control that lets the invariant test fail: W + BA in fp64 changes HE far above RoPO's bound."""
    torch.manual_seed(0)
    weight = torch.randn(24, 32, dtype=torch.float64)
    b, a = 1e-3 * torch.randn(24, 4, dtype=torch.float64), torch.randn(4, 32, dtype=torch.float64)
    before = hyperspherical_energy(weight)
    assert abs(hyperspherical_energy(weight + b @ a) - before) / before > 1e-8


def test_chunked_energy_equals_dense():
    weight = torch.randn(23, 16, dtype=torch.float64)
    unit = weight / weight.norm(dim=1, keepdim=True)
    dist = (unit[:, None] - unit[None]).norm(dim=-1)
    dense = (1 / dist[~torch.eye(23, dtype=torch.bool)]).sum()
    for chunk in (1, 7, 23):
        assert_close(hyperspherical_energy(weight, chunk), dense, rtol=1e-12, atol=0)


def test_untrained_policy_equals_the_reference_bitwise(tokenizer):
    model = make_tiny_model(tokenizer)
    reference_logits = model(torch.tensor([[1, 520, 9531, 198, 19556]])).logits
    param = build_parametrization("ropo", RopoParams(), model)
    ids = torch.tensor([[1, 520, 9531, 198, 19556, 665, 2], [1, 19556, 665, 2, 2, 2, 2]])
    mask = (torch.arange(7) < torch.tensor([[7], [4]])).long()
    targets = torch.roll(ids, -1, dims=1)
    seq = torch.where(torch.arange(7) >= 2, torch.arange(2)[:, None], -1)
    scorer = SequenceScorer(param.model)
    with torch.no_grad():
        policy = scorer(ids, mask, targets, seq, 2)[0]
        with param.reference():
            reference = scorer(ids, mask, targets, seq, 2)[0]
        assert torch.equal(policy, reference)
        assert torch.equal(param.model(torch.tensor([[1, 520, 9531, 198, 19556]])).logits, reference_logits)
    for layer in param.layers.values():
        assert torch.equal(layer.merged_weight(), layer.base.weight.float())


def test_only_rotation_and_magnitude_get_gradients(tokenizer):
    param = build_parametrization("ropo", RopoParams(), make_tiny_model(tokenizer))
    param.model(torch.tensor([[1, 520, 9531, 198]])).logits.sum().backward()
    for name, p in param.model.named_parameters():
        trained = ".rotation." in name or name.endswith(".magnitude")
        assert p.requires_grad == trained, name
        assert (p.grad is not None) == trained, name
    trainable, _ = param.parameter_counts()
    assert trainable == param.trainable_count_formula() > 0


def test_count_of_the_worked_example():
    """Llama-3-8B with the default structure on q_proj and v_proj: 688,128 free parameters (0.00857%)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
    with torch.device("meta"):
        param = build_parametrization("ropo", RopoParams(), LlamaForCausalLM(config))
    trainable, total = param.parameter_counts()
    assert trainable == param.trainable_count_formula() == 688_128
    assert total - trainable == 8_030_261_248
    assert round(100 * trainable / (total - trainable), 5) == 0.00857


def test_a_layer_width_the_factors_do_not_divide_is_refused():
    with pytest.raises(ValueError, match="^factors: factor \\(2, 8\\) needs in_features divisible by 16; a targeted "
                                         "layer has in_features=24$"):
        RopoLinear(nn.Linear(24, 8), RopoParams())


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """Ten DPO steps of RoPO and of LoRA on the tiny model, with the HE monitor at every step.

    (The tiny model's rows have norms near 0.1: at lr 2e-2 Adam drives some absolute magnitudes below zero,
    a flipped neuron, and HE moves; ``magnitude_param: log`` rules that out.)
    """
    root = tmp_path_factory.mktemp("ropo")
    data = write_jsonl(root / "d.jsonl", sentiment_rows(16))
    runs = {}
    for kind in ("ropo", "lora"):
        cfg = load_config(None, [f"model.name={tiny_model_dir}", f"data.train={data}", "data.eval=null",
                                 f"output_dir={root / kind}", "train.max_steps=10", "train.lr=5e-3",
                                 "train.progress=false", "train.save_steps=5", f"parametrization.kind={kind}",
                                 "diag.probe_every=5", "diag.he_every=1", "diag.probe_prompts=2",
                                 "diag.probe_max_new_tokens=8", "diag.seen_pairs=4"])
        train(cfg)
        runs[kind] = root / kind
    return runs


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_keeps_rotations_orthogonal_and_energy_fixed_while_lora_moves_it(trained, tiny_model_dir):
    from preflab.models.loader import load_model

    state = load_file(sorted((trained["ropo"] / "checkpoints").iterdir())[-1] / "trainable.safetensors")
    param = build_parametrization("ropo", RopoParams(), load_model(str(tiny_model_dir)))
    assert any(v.abs().max() > 0 for k, v in state.items() if ".rotation." in k)  # it trained
    assert all(v.min() > 0 for k, v in state.items() if k.endswith(".magnitude"))
    param.load_trainable_state_dict(state)
    for layer in param.layers.values():
        r = _rotation(layer)
        assert (r.T @ r - torch.eye(r.shape[0])).abs().max() <= 1e-5
    ropo, lora = _records(trained["ropo"]), _records(trained["lora"])
    assert len(ropo) == 10 and all(r["he/drift_max"] <= 1e-10 for r in ropo)  # fp64 read-off: exact
    assert lora[-1]["he/drift_max"] > 10 * max(r["he/drift_max"] for r in ropo)
    assert lora[-1]["he/drift_max"] > 1e-5


def test_final_model_loads_with_plain_transformers_and_equals_the_ropo_model(trained, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from preflab.models.loader import load_model

    final = trained["ropo"] / "final"
    assert (final / "ropo.safetensors").stat().st_size < 100_000
    param = build_parametrization("ropo", RopoParams(), load_model(str(tiny_model_dir)))
    param.load_trainable_state_dict(load_file(final / "ropo.safetensors"))
    ids = torch.tensor([[1, 520, 9531, 198, 19556, 665, 2]])
    merged = AutoModelForCausalLM.from_pretrained(final).eval()
    with torch.no_grad():
        expected = param.model.eval()(ids).logits
        assert_close(merged(ids).logits, expected, atol=1e-4, rtol=0)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        assert not torch.allclose(base(ids).logits, expected, atol=1e-4)  # training changed the model
