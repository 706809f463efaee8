"""LoRA continued from a saved adapter (``parametrization.init_adapter``): the policy trains that adapter, the
reference is the model with the adapter as loaded."""

import json

import pytest
import torch
from conftest import make_tiny_model
from peft import LoraConfig, get_peft_model

from preflab.adapters import build_parametrization
from preflab.adapters.lora import LoraParams


@pytest.fixture()
def sft_adapter(tokenizer, tmp_path):
    """An "SFT" LoRA adapter whose B is not zero (so that base and base + adapter differ)."""
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    peft = get_peft_model(make_tiny_model(tokenizer, seed=1), config)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    peft.save_pretrained(tmp_path / "sft")
    return tmp_path / "sft", {k: v.detach().clone() for k, v in peft.named_parameters() if "lora_" in k}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_the_policy_continues_the_adapter_and_the_reference_keeps_it_as_loaded(tokenizer, sft_adapter, tmp_path):
    path, saved = sft_adapter
    param = build_parametrization("lora", LoraParams(r=4, alpha=8, init_adapter=str(path)),
                                  make_tiny_model(tokenizer, seed=1))
    trainable = param.trainable_parameters()
    assert trainable and all(".default." in n for n in trainable)
    assert {n: p for n, p in trainable.items()}.keys() == {k for k in saved}
    assert all(torch.equal(p, saved[n]) for n, p in trainable.items())  # it starts from the adapter's factors
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    base = _logits(make_tiny_model(tokenizer, seed=1), ids)
    start = _logits(param.model, ids)
    assert not torch.allclose(start, base, atol=1e-4)  # the adapter acts
    with param.reference() as ref:
        assert torch.equal(_logits(ref, ids), start)  # the policy starts equal to the reference
    with torch.no_grad():
        for p in trainable.values():
            p.add_(0.1)
    assert not torch.allclose(_logits(param.model, ids), start, atol=1e-4)
    with param.reference() as ref:
        assert torch.equal(_logits(ref, ids), start)  # training moves the policy, not the reference
    assert param.trainable_parameters().keys() == trainable.keys()  # the switch leaves the trainable set as it was
    param.save_final(tmp_path / "final")
    assert not (tmp_path / "final" / "reference").exists()
    assert (tmp_path / "final" / "adapter_model.safetensors").is_file()
    merged = param.merged_model()
    assert torch.allclose(_logits(merged, ids), _logits(param.model, ids), atol=1e-5)


def test_settings_that_differ_from_the_adapter_are_refused_by_key(tokenizer, sft_adapter, tmp_path):
    path, _ = sft_adapter
    with pytest.raises(ValueError, match=r"r: 8 differs from the init_adapter's 4 .*parametrization.r=4"):
        build_parametrization("lora", LoraParams(r=8, alpha=8, init_adapter=str(path)), make_tiny_model(tokenizer))
    with pytest.raises(ValueError, match="set parametrization.kind=lora"):
        build_parametrization("dora", LoraParams(r=4, alpha=8, init_adapter=str(path)), make_tiny_model(tokenizer))
    with pytest.raises(ValueError, match="target_modules: \\['q_proj'\\] differ"):
        build_parametrization("lora", LoraParams(r=4, alpha=8, target_modules=("q_proj",), init_adapter=str(path)),
                              make_tiny_model(tokenizer))
    with pytest.raises(ValueError, match="holds no adapter_config.json"):
        build_parametrization("lora", LoraParams(r=4, alpha=8, init_adapter=str(tmp_path)), make_tiny_model(tokenizer))
    assert json.loads((path / "adapter_config.json").read_text())["r"] == 4
