"""RoPO beyond the default path: option bounds, the Neumann series term by term, initial magnitudes, half precision,
the no-grad cache, which layers are targeted, the merged model of a biased fp64 model, the parameter count."""

import pytest
import torch
from torch import nn

from preflab.adapters.ropo import Ropo, RopoLinear, RopoParams, cayley_minus_identity

F64 = torch.float64


@pytest.mark.parametrize("options,message", [
    ({"target_modules": ()}, "^target_modules: must name at least one module"),
    ({"factors": ()}, "^factors: must hold at least one"),
    ({"factors": ((1, 1),)}, r"^factors: block size must be >= 2 and stride >= 1, got \(1, 1\)"),
    ({"factors": ((2, 0),)}, r"^factors: block size must be >= 2 and stride >= 1, got \(2, 0\)"),
    ({"neumann_terms": 0}, "^neumann_terms: must be >= 1, got 0"),
])
def test_bad_options_name_the_field(options, message):
    with pytest.raises(ValueError, match=message):
        RopoParams(**options)


def test_the_smallest_options_are_accepted():
    params = RopoParams(factors=((2, 1), (3, 1)), neumann_terms=1)
    assert params.factors == ((2, 1), (3, 1)) and params.neumann_terms == 1


def test_the_neumann_series_has_exactly_the_asked_terms():
    """R − I = 2Q·Σ_{k<n} Qᵏ for the skew Q of one 3×3 block (free parameters q12, q13, q23)."""
    free = torch.tensor([[0.1, -0.2, 0.05]], dtype=F64)
    q = torch.tensor([[0.0, 0.1, -0.2], [-0.1, 0.0, 0.05], [0.2, -0.05, 0.0]], dtype=F64)
    for n in (1, 2, 4):
        series = sum(torch.linalg.matrix_power(q, k) for k in range(n))
        torch.testing.assert_close(cayley_minus_identity(free, 3, n)[0], 2 * q @ series, rtol=0, atol=1e-15)
    exact = 2 * q @ torch.linalg.inv(torch.eye(3, dtype=F64) - q)
    torch.testing.assert_close(cayley_minus_identity(free, 3)[0], exact, rtol=0, atol=1e-15)


@pytest.mark.parametrize("magnitude,param,start", [("absolute", "linear", "norm"), ("relative", "linear", "ones"),
                                                   ("absolute", "log", "zeros"), ("relative", "log", "zeros")])
def test_initial_magnitudes(magnitude, param, start):
    base = nn.Linear(8, 5)
    layer = RopoLinear(base, RopoParams(factors=((2, 1),), magnitude=magnitude, magnitude_param=param))
    want = {"norm": base.weight.detach().norm(dim=1), "ones": torch.ones(5), "zeros": torch.zeros(5)}[start]
    torch.testing.assert_close(layer.magnitude.detach(), want, rtol=0, atol=0)
    assert "row_norm" in layer.state_dict()  # the reference norms travel with the module


def test_half_precision_layers_keep_fp32_norms_and_compute_in_their_dtype():
    base = nn.Linear(8, 4).to(torch.bfloat16)
    layer = RopoLinear(base, RopoParams(factors=((2, 1), (2, 2))))
    with torch.no_grad():
        layer.rotation[0].normal_(0, 0.3)
        layer.magnitude.mul_(1.5)
    assert layer.row_norm.dtype == torch.float32 and layer.rotation[0].dtype == torch.float32
    out = layer(torch.randn(3, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert layer.merged_weight().dtype == torch.float32


def test_rotation_deltas_are_cached_without_autograd_until_a_parameter_changes():
    layer = RopoLinear(nn.Linear(8, 4), RopoParams(factors=((2, 1),)))
    with torch.no_grad():
        first = layer.rotation_deltas()
        assert layer.rotation_deltas() is first  # decoding calls every layer once per token: no second solve
        layer.rotation[0].add_(0.1)
        moved = layer.rotation_deltas()
        assert moved is not first and not torch.equal(moved[0], first[0])
    assert layer.rotation_deltas() is not layer.rotation_deltas()  # with autograd: always fresh


class _Custom(nn.Module):
    """A top-level biased Linear, a nested one, and an untied head."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.block = nn.Sequential(nn.Linear(8, 8, bias=False))
        self.head = nn.Linear(8, 3)

    def get_output_embeddings(self):
        return self.head

    def forward(self, x):
        return self.head(self.block(self.proj(x)))


def _moved(param: Ropo) -> Ropo:
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in param.layers.values():
            for p in layer.rotation:
                p.normal_(0, 0.3)
            layer.magnitude.mul_(torch.empty_like(layer.magnitude).uniform_(0.5, 1.5))
    return param


def test_targets_by_name_or_all_linear_never_the_head():
    assert list(Ropo(_Custom(), RopoParams(target_modules=("all-linear",), factors=((2, 1),))).layers) == \
        ["proj", "block.0"]
    assert list(Ropo(_Custom(), RopoParams(target_modules=("proj",), factors=((2, 1),))).layers) == ["proj"]
    assert list(Ropo(_Custom(), RopoParams(target_modules=("0",), factors=((2, 1),))).layers) == ["block.0"]
    with pytest.raises(ValueError, match=r"^target_modules: no nn.Linear named \['nope'\] in _Custom$"):
        Ropo(_Custom(), RopoParams(target_modules=("nope",)))
    headless = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))  # no get_output_embeddings: all targeted
    assert list(Ropo(headless, RopoParams(target_modules=("all-linear",), factors=((2, 1),))).layers) == ["0", "2"]


def test_the_merged_model_of_a_biased_fp64_model_computes_the_policy_and_leaves_it_intact():
    torch.manual_seed(1)
    param = _moved(Ropo(_Custom().double(), RopoParams(target_modules=("all-linear",), factors=((2, 1), (2, 2)))))
    x = torch.randn(5, 8, dtype=F64)
    with torch.no_grad():
        want = param.model(x)
        merged = param.merged_model()
        torch.testing.assert_close(merged(x), want, rtol=0, atol=1e-12)
        torch.testing.assert_close(param.model(x), want, rtol=0, atol=0)  # the policy itself is unchanged
    assert isinstance(param.model.proj, RopoLinear) and type(merged.proj) is nn.Linear
    assert merged.proj.weight.dtype == F64 and merged.proj.bias is not None and merged.block[0].bias is None
    assert not any(p.requires_grad for p in merged.parameters())  # a plain model for inference and export


def test_save_final_writes_the_merged_model_and_the_ropo_state(tmp_path):
    import json

    from safetensors.torch import load_file

    class Saveable(_Custom):  # save_pretrained without transformers: the merged model's state dict
        def save_pretrained(self, out_dir):
            torch.save(self.state_dict(), f"{out_dir}/model.pt")

    param = _moved(Ropo(Saveable(), RopoParams(target_modules=("proj",), factors=((2, 1),))))
    param.save_final(tmp_path)
    state = load_file(tmp_path / "ropo.safetensors")
    assert state.keys() == param.trainable_state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in param.trainable_state_dict().items())
    config = json.loads((tmp_path / "ropo.json").read_text())
    assert config["layers"] == ["proj"] and config["factors"] == [[2, 1]] and config["magnitude"] == "absolute"
    merged = torch.load(tmp_path / "model.pt")
    torch.testing.assert_close(merged["proj.weight"], param.layers["proj"].merged_weight(), rtol=0, atol=0)


@pytest.mark.parametrize("magnitude", ["absolute", "none"])
def test_the_count_formula_counts_the_free_parameters(magnitude):
    """Per layer: in·(b−1)/2 per factor (b(b−1)/2 per b×b block), plus one magnitude per output unless none."""
    param = Ropo(_Custom(), RopoParams(target_modules=("all-linear",), factors=((4, 1), (2, 2)), magnitude=magnitude))
    counted = sum(p.numel() for p in param.model.parameters() if p.requires_grad)
    assert param.trainable_count_formula() == counted == 2 * (8 * 3 // 2 + 8 * 1 // 2) + 2 * 8 * (magnitude != "none")


@pytest.mark.parametrize("targets,factors,message", [
    (("down_proj",), ((3, 1),), r"^factors: factor \(3, 1\) needs in_features divisible by 3; "
                                r"layer model.layers.0.mlp.down_proj has in_features=64$"),
    (("down_proj", "q_proj"), ((2, 1), (2, 32)), r"^factors: factor \(2, 32\) needs in_features divisible by 64; "
                                                 r"layer model.layers.0.self_attn.q_proj has in_features=32$"),
])
def test_the_factors_are_checked_against_every_targeted_layer_of_a_skeleton(targets, factors, message):
    from conftest import tiny_config
    from transformers import LlamaForCausalLM

    from preflab.adapters.ropo import check_layers

    with torch.device("meta"):  # shapes only, as before a run
        model = LlamaForCausalLM(tiny_config(100))
    with pytest.raises(ValueError, match=message):
        check_layers(model, RopoParams(target_modules=targets, factors=factors))
    check_layers(model, RopoParams(target_modules=("down_proj",), factors=((2, 32),)))  # 64 = 2·32 divides 64
    check_layers(model, RopoParams(target_modules=("all-linear",), factors=((2, 16), (4, 4))))
