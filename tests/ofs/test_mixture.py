"""Stored LoRA modules on a live model (COFS-DPO): weights (1, 0) give module 1, a combination equals its folded
dense weights and its exported PEFT adapter, folding then adding B = 0 modules changes nothing; the weight search."""

import copy
import json
import shutil

import pytest
import torch
from conftest import make_tiny_model, sentiment_rows
from safetensors.torch import save_file
from torch.testing import assert_close

from preflab.data.collate import collate_pairs
from preflab.data.formats import normalize_row
from preflab.data.tokenize import PairTokenizer
from preflab.models.scorer import SequenceScorer
from preflab.ofs.combine import (
    AtomMixture,
    LoraAtom,
    fold_into,
    read_lora_adapter,
    save_concat_adapter,
    write_peft_lora,
)
from preflab.ofs.pair import FastSlowLora
from preflab.ofs.weights import grid_choice, pgd_choice


@pytest.fixture(scope="module")
def batch(tokenizer):
    pt = PairTokenizer(tokenizer)
    rows = sentiment_rows(4)
    return collate_pairs([pt(normalize_row(r, f"row {i}")) for i, r in enumerate(rows)], tokenizer.pad_token_id,
                         "shared")


@pytest.fixture(scope="module")
def modules(tokenizer, tmp_path_factory):
    """Two trained-looking modules of ranks 4 and 2 on one tiny base, saved as PEFT adapters."""
    base = make_tiny_model(tokenizer, seed=3)
    out = tmp_path_factory.mktemp("modules")
    g = torch.Generator().manual_seed(0)
    for i, (r, alpha) in enumerate([(4, 8.0), (2, 6.0)]):
        pair = FastSlowLora(copy.deepcopy(base), r=r, alpha=alpha)
        with torch.no_grad():
            for layer in pair.layers.values():
                layer.lora_B["fast"].copy_(torch.randn(layer.lora_B["fast"].shape, generator=g) * 0.1)
        pair.save_adapter("fast", out / f"m{i}")
    return base, [out / "m0", out / "m1"]


def _logps(model, batch):
    with torch.no_grad():
        return SequenceScorer(model.eval())(**batch.scorer_inputs())[0]


def _peft(base, path):
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base), path).eval()


def test_unit_weights_give_each_module_and_none_gives_the_base(modules, batch):
    base, paths = modules
    atoms = [read_lora_adapter(p) for p in paths]
    model = copy.deepcopy(base)
    mixture = AtomMixture(model, atoms)
    assert mixture.model is model and not any(p.requires_grad for p in model.parameters())
    assert torch.equal(_logps(model, batch), _logps(base, batch))  # before any set: the base
    mixture.set(None)
    assert torch.equal(_logps(model, batch), _logps(base, batch))
    for i, w in enumerate(([1.0, 0.0], [0.0, 1.0])):
        mixture.set(torch.tensor(w))
        # summed log-probs near −75: 1e-6 relative is a few fp32 ulps (a different summation order than PEFT's)
        assert_close(_logps(model, batch), _logps(_peft(base, paths[i]), batch), atol=0, rtol=1e-6)
    assert not torch.equal(_logps(model, batch), _logps(base, batch))


def test_a_combination_equals_its_folded_weights_and_its_exported_adapter(modules, batch, tmp_path):
    base, paths = modules
    atoms = [read_lora_adapter(p) for p in paths]
    coeffs = [0.3, 0.7]
    model = copy.deepcopy(base)
    AtomMixture(model, atoms).set(torch.tensor(coeffs))
    want = _logps(model, batch)
    dense = copy.deepcopy(base)
    fold_into(dense, atoms, coeffs)
    assert_close(_logps(dense, batch), want, atol=1e-5, rtol=0)
    assert save_concat_adapter(atoms, coeffs, tmp_path / "c", None) == 6  # r = 4 + 2
    assert_close(_logps(_peft(base, tmp_path / "c"), batch), want, atol=1e-5, rtol=0)
    assert save_concat_adapter(atoms, [1.0, 0.0], tmp_path / "one", None) == 4  # the zero-weight module dropped
    assert_close(_logps(_peft(base, tmp_path / "one"), batch), _logps(_peft(base, paths[0]), batch), atol=0,
                 rtol=1e-6)


def test_folding_a_combination_then_adding_fresh_modules_changes_nothing(modules, batch):
    base, paths = modules
    atoms = [read_lora_adapter(paths[0])]
    dense = copy.deepcopy(base)
    fold_into(dense, atoms, [1.0])  # D = 1: the combination is the module itself
    pair = FastSlowLora(dense, r=4, alpha=8)  # B = 0
    with pair.routed("fast") as model:
        assert_close(_logps(model, batch), _logps(_peft(base, paths[0]), batch), atol=1e-5, rtol=0)


def test_the_grid_picks_the_module_better_on_every_pair_and_breaks_ties_to_the_newest():
    g = torch.Generator().manual_seed(0)
    m2 = torch.randn(16, generator=g)
    m1 = m2 + 0.5 + torch.rand(16, generator=g)  # module 1's margin is larger on every pair

    def dpo_loss(w):  # the margin of θ₀ + C(w) is linear in w
        return -torch.nn.functional.logsigmoid(w[0] * m1 + w[1] * m2).mean().item()

    choice = grid_choice(dpo_loss, 2, 0.1)
    assert choice.weights == (1.0, 0.0) and len(choice.tried) == 11
    assert choice.objective == min(t["objective"] for t in choice.tried)
    assert grid_choice(lambda w: 1.0, 3, 0.5).weights == (0.0, 0.0, 1.0)  # all tied: the newest module
    assert grid_choice(lambda w: 1.0, 3, 0.5, maximize=True).weights == (0.0, 0.0, 1.0)
    # tied wherever w₃ < 1: of those, the first with the largest w₃ (0, ¼, ¾), not one with a larger w₂ or a later
    # one with the same w₃ (¼, 0, ¾)
    assert grid_choice(lambda w: float(w[2] == 1), 3, 0.25).weights == (0.0, 0.25, 0.75)
    accuracy = grid_choice(lambda w: float(w[1] > 0.35), 2, 0.1, maximize=True)
    assert accuracy.weights == (0.0, 1.0)


def test_projected_gradient_descent_finds_the_constrained_minimum():
    target = torch.tensor([0.7, 0.6, -0.4], dtype=torch.float64)  # off the simplex; its projection is (0.55, 0.45, 0)

    def loss_and_grad(w):
        loss = ((w - target) ** 2).sum()
        loss.backward()
        return loss.item()

    sgd = pgd_choice(loss_and_grad, 3, steps=100, lr=0.1, optimizer="sgd")
    assert sgd.weights == pytest.approx((0.55, 0.45, 0.0), abs=1e-6) and len(sgd.tried) == 101
    # Adam (the spec's reading) stays on the simplex and improves on the uniform start, but stalls on the face
    adam = pgd_choice(loss_and_grad, 3, steps=50, lr=0.05)
    assert sum(adam.weights) == pytest.approx(1.0) and min(adam.weights) >= 0 and adam.weights[2] == 0
    assert adam.objective < adam.tried[0]["objective"] - 0.5
    assert sgd.objective <= adam.objective
    assert len(adam.tried) == 51 and adam.objective == min(t["objective"] for t in adam.tried)
    assert adam.weights != pgd_choice(loss_and_grad, 3, steps=50, lr=0.05, optimizer="sgd").weights  # Adam by default

    def negated(w):  # the same descent, scored by a number to maximize (as accuracy is)
        return -loss_and_grad(w)

    best = pgd_choice(negated, 3, steps=100, lr=0.1, optimizer="sgd", maximize=True)
    assert best.weights == pytest.approx((0.55, 0.45, 0.0), abs=1e-6) and best.objective == -sgd.objective


def test_an_adapter_directory_is_read_with_its_scale_and_checked(modules, tmp_path):
    base, paths = modules
    atoms = read_lora_adapter(paths[1])  # r = 2, alpha = 6
    assert {a.scale for a in atoms.values()} == {3.0} and all(a.A.shape[0] == 2 for a in atoms.values())
    config = json.loads((paths[1] / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 6.0
    rs = tmp_path / "rslora"
    shutil.copytree(paths[1], rs)
    (rs / "adapter_config.json").write_text(json.dumps({**config, "use_rslora": True}))
    assert [a.scale for a in read_lora_adapter(rs).values()] == pytest.approx([6 / 2 ** 0.5] * len(atoms))
    layer = sorted(atoms)[0]
    assert layer in dict(base.named_modules())  # PEFT's prefix is taken off the layer path
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "adapter_config.json").write_text(json.dumps(config))
    save_file({"x": torch.zeros(1)}, empty / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="no LoRA factors"):
        read_lora_adapter(empty)


def test_the_exported_adapter_config_and_the_refusals(modules, tmp_path):
    base, paths = modules
    atoms = [read_lora_adapter(p) for p in paths]
    assert save_concat_adapter(atoms, [0.0, 1.0], tmp_path / "c", "some/base") == 2
    assert save_concat_adapter(atoms, [0.0, 1.0], tmp_path / "c", "some/base") == 2  # again, over the first
    text = (tmp_path / "c" / "adapter_config.json").read_text()
    config = json.loads(text)
    assert text == json.dumps(config, indent=2)
    assert config == {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 2, "lora_dropout": 0.0,
                      "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
                      "target_modules": sorted({n.rsplit(".", 1)[-1] for n in atoms[0]}),
                      "base_model_name_or_path": "some/base", "inference_mode": True}
    with pytest.raises(ValueError, match="^every combination weight is 0: nothing to export$"):
        save_concat_adapter(atoms, [0.0, 0.0], tmp_path / "z", None)
    dense = copy.deepcopy(base)
    fold_into(dense, atoms, [0.0, 0.0])  # nothing to add
    assert all(torch.equal(p, q) for p, q in zip(dense.parameters(), base.parameters()))
    other = {**atoms[1]}
    other.pop(sorted(other)[0])
    with pytest.raises(ValueError, match="module 2 targets other layers than module 1"):
        AtomMixture(copy.deepcopy(base), [atoms[0], other])


def test_the_live_mixture_in_bf16_holds_no_saved_buffers(modules, batch):
    base, paths = modules
    atoms = [read_lora_adapter(p) for p in paths]
    model = copy.deepcopy(base).to(torch.bfloat16)
    AtomMixture(model, atoms).set(torch.tensor([0.3, 0.7]))
    assert not any(k.endswith((".A", ".B")) for k in model.state_dict())  # the atoms are no weights of the model
    dense = copy.deepcopy(base).to(torch.bfloat16)
    fold_into(dense, atoms, [0.3, 0.7])
    assert_close(_logps(model, batch), _logps(dense, batch), atol=0.5, rtol=0)


def test_a_rank_one_combination_exports(tmp_path):
    g = torch.Generator().manual_seed(0)
    layer = "model.layers.0.self_attn.q_proj"
    module = {layer: LoraAtom(torch.randn(1, 8, generator=g), torch.randn(8, 1, generator=g), 2.0)}
    assert save_concat_adapter([module, module], [1.0, 0.0], tmp_path / "r1", None) == 1
    assert json.loads((tmp_path / "r1" / "adapter_config.json").read_text())["r"] == 1
    write_peft_lora({}, 1, 1, ["proj"], None, tmp_path / "top")  # a layer at the model's top level
    assert json.loads((tmp_path / "top" / "adapter_config.json").read_text())["target_modules"] == ["proj"]
