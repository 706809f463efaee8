"""A fast/slow pair of any parametrization (DoRA, RoPO, full): both start at the reference, share the frozen tensors
(and full fine-tuning's reference copy), route each forward to one module, save and load a module, export the
resting one; the LoRA pair with dropout and named targets."""

import json

import pytest
import torch
from conftest import make_tiny_model, sentiment_rows

from preflab.config import load_config
from preflab.data.collate import collate_pairs
from preflab.data.formats import normalize_row
from preflab.data.tokenize import PairTokenizer
from preflab.models.scorer import SequenceScorer
from preflab.ofs.module_pair import ModulePair, build_pair
from preflab.ofs.pair import FastSlowPair

KINDS = {"dora": ["parametrization.kind=dora", "parametrization.r=4"],
         "ropo": ["parametrization.kind=ropo", "parametrization.target_modules=[all-linear]",
                  "parametrization.factors=[[2,1],[2,2]]"],
         "full": ["parametrization.kind=full"]}


@pytest.fixture(scope="module")
def batch(tokenizer):
    pt = PairTokenizer(tokenizer)
    pairs = [pt(normalize_row(r, str(i))) for i, r in enumerate(sentiment_rows(4))]
    return collate_pairs(pairs, tokenizer.pad_token_id, "shared")


def _pair(tokenizer, kind):
    pc = load_config(None, KINDS[kind]).parametrization
    return build_pair(pc.name, pc.params, make_tiny_model(tokenizer, seed=3))


def _logps(module, batch):
    with torch.no_grad():
        return SequenceScorer(module.eval())(**batch.scorer_inputs())[0]


def _perturb(params, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("kind", list(KINDS))
def test_both_modules_start_at_the_reference_and_share_what_they_do_not_train(tokenizer, batch, kind):
    pair = _pair(tokenizer, kind)
    assert isinstance(pair, ModulePair) and not pair.fused
    with pair.reference() as ref:
        reference = _logps(ref, batch)
    for m in ("fast", "slow"):
        with pair.routed(m) as model:
            torch.testing.assert_close(_logps(model, batch), reference, rtol=0, atol=1e-6)
    assert pair.resting == "fast" and pair.model.config is pair.modules["fast"].model.config
    assert type(pair.model.get_base_model()).__name__ == "LlamaForCausalLM"  # what the scorer runs: the causal LM
    assert pair.count_convention == f"{pair.modules['fast'].count_convention}, both modules"
    fast, slow = (dict(pair.modules[m].model.named_parameters(remove_duplicate=False)) for m in ("fast", "slow"))
    frozen = [n for n, p in fast.items() if not p.requires_grad]
    assert all(slow[n] is fast[n] for n in frozen)  # one copy of the base weights (a tied one under both names)
    assert all(torch.equal(p, q) for p, q in zip(pair.parameters("fast"), pair.parameters("slow")))  # init_same
    trained = {id(p) for p in pair.parameters("fast")}
    assert trained and not trained & {id(p) for p in pair.parameters("slow")}
    if kind == "full":
        assert not frozen and pair.modules["slow"].reference_model is pair.modules["fast"].reference_model
    names = list(pair.trainable_parameters())
    assert names and all(n.startswith(("fast.", "slow.")) for n in names)


@pytest.mark.parametrize("kind", list(KINDS))
def test_routing_save_load_and_export_follow_the_modules(tokenizer, batch, kind, tmp_path):
    pair = _pair(tokenizer, kind)
    _perturb(pair.parameters("slow"), seed=1)
    with pair.routed("fast") as model:
        fast = _logps(model, batch)
    with pair.routed("slow") as model:
        slow = _logps(model, batch)
    assert (fast - slow).abs().max() > 1e-3
    pair.rest_on("slow")
    assert pair.resting == "slow"
    torch.testing.assert_close(_logps(pair.model, batch), slow, rtol=0, atol=0)  # a forward outside a route: resting
    ids = batch.input_ids[:2, :8]
    with torch.no_grad():  # the pair called directly (positional and keyword) is the resting module's network
        want = pair.modules["slow"].model(input_ids=ids).logits
        assert torch.equal(pair.model(ids).logits, want) and torch.equal(pair.model(input_ids=ids).logits, want)
    torch.testing.assert_close(_logps(pair.merged_model(), batch), slow, rtol=1e-5, atol=1e-5)
    pair.save_module("slow", tmp_path / "a" / "slow")
    pair.save_module("slow", tmp_path / "a" / "slow")  # again, over the first
    pair.load_module("fast", tmp_path / "a" / "slow")  # the slow module's tensors into the fast slot
    with pair.routed("fast") as model:
        torch.testing.assert_close(_logps(model, batch), slow, rtol=0, atol=0)
    with pytest.raises(ValueError, match="runs one module per forward"):
        with pair.routed("split", 4):
            pass


def test_the_lora_pair_takes_dropout_and_named_targets(tokenizer, batch, tmp_path):
    from peft import PeftModel

    pc = load_config(None, ["parametrization.r=4", "parametrization.dropout=0.2",
                            "parametrization.target_modules=[q_proj,v_proj]"]).parametrization
    pair = build_pair(pc.name, pc.params, make_tiny_model(tokenizer, seed=3))
    assert isinstance(pair, FastSlowPair) and pair.fused
    assert {n.rsplit(".", 1)[-1] for n in pair.pair.layers} == {"q_proj", "v_proj"}
    _perturb([p for layer in pair.pair.layers.values() for p in (layer.lora_B["fast"],)], seed=2)
    pair.model.train()
    with pair.routed("fast") as model:
        noisy = [_logps_train(model, batch) for _ in range(2)]
    assert not torch.equal(noisy[0], noisy[1])  # dropout acts in training mode
    pair.save_module("fast", tmp_path / "fast")
    config = json.loads((tmp_path / "fast" / "adapter_config.json").read_text())
    assert config["lora_dropout"] == 0.2 and config["target_modules"] == ["q_proj", "v_proj"]
    base = make_tiny_model(tokenizer, seed=3)
    loaded = PeftModel.from_pretrained(base, tmp_path / "fast").eval()
    with pair.routed("fast") as model:
        torch.testing.assert_close(_logps(loaded, batch), _logps(model, batch), rtol=1e-5, atol=1e-5)


def _logps_train(model, batch):
    with torch.no_grad():
        return SequenceScorer(model)(**batch.scorer_inputs())[0]


def test_a_pair_built_directly_starts_its_modules_alike_unless_told_not_to(tokenizer):
    from preflab.adapters import parametrization_registry

    pc = load_config(None, KINDS["dora"]).parametrization
    spec = parametrization_registry()[pc.name]
    same = ModulePair(make_tiny_model(tokenizer, seed=3), lambda m: spec.build(m, pc.params))
    assert all(torch.equal(p, q) for p, q in zip(same.parameters("fast"), same.parameters("slow")))
    apart = ModulePair(make_tiny_model(tokenizer, seed=3), lambda m: spec.build(m, pc.params), init_same=False)
    assert not all(torch.equal(p, q) for p, q in zip(apart.parameters("fast"), apart.parameters("slow")))
    apart = build_pair(pc.name, pc.params, make_tiny_model(tokenizer, seed=3), init_same=False)
    assert not all(torch.equal(p, q) for p, q in zip(apart.parameters("fast"), apart.parameters("slow")))
