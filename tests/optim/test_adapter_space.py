"""Online merging in adapter space (``optim.adapter_mode: adapter_space``, spec online-merging.md §8): θ_SFT was a
LoRA adapter φ_SFT on the base, DPO continues training it, τ = φ_SFT − φ_init over the adapter's own tensors."""

import math

import pytest
import torch
from conftest import make_tiny_model, sentiment_rows, train_until_killed, write_jsonl
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from preflab.config import ConfigError, load_config
from preflab.train import TrainingRun, train


@pytest.fixture(scope="module")
def adapters(tokenizer, tiny_model_dir, tmp_path_factory):
    """φ_init (B = 0, PEFT's random A) and φ_SFT (both factors moved) of one LoRA adapter on the tiny model."""
    root = tmp_path_factory.mktemp("adapter_space")
    torch.manual_seed(3)
    peft = get_peft_model(make_tiny_model(tokenizer), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    peft.save_pretrained(root / "init")
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.add_(0.1 * torch.randn_like(p))
    peft.save_pretrained(root / "sft")
    return root / "init", root / "sft", write_jsonl(root / "d.jsonl", sentiment_rows(8))


def _cfg(tiny_model_dir, adapters, out, *extra):
    init, sft, data = adapters
    return load_config(None, [
        f"model.name={tiny_model_dir}", f"data.train={data}", "data.eval=null", f"output_dir={out}",
        "train.progress=false", "train.warmup_ratio=0", "diag.enabled=false", "train.lr=1e-3",
        f"parametrization={{kind: lora, r: 4, alpha: 8, init_adapter: {sft}}}", "optim.adapter_mode=adapter_space",
        *extra])


def _taus(run):
    state = run.optimizer.state
    return {n: state[p]["tau"] for n, p in run.param.trainable_parameters().items() if "tau" in state[p]}


@pytest.mark.parametrize("name", ["ondare_adamw", "onties_adamw"])
def test_the_task_vector_is_the_sft_adapter_minus_its_initial_factors(tiny_model_dir, adapters, tmp_path, name):
    init, sft = (load_file(d / "adapter_model.safetensors") for d in adapters[:2])
    clip = ["optim.clip=1000"] if name == "ondare_adamw" else []
    with_init = _taus(TrainingRun(_cfg(tiny_model_dir, adapters, tmp_path / "a", f"optim.name={name}",
                                       "optim.reserve_p=1", f"optim.adapter_init={adapters[0]}", *clip)))
    without = _taus(TrainingRun(_cfg(tiny_model_dir, adapters, tmp_path / "b", f"optim.name={name}",
                                     "optim.reserve_p=1", *clip)))
    assert with_init.keys() == without.keys() and len(with_init) == len(sft)
    for name_, tau in with_init.items():
        key = name_.replace(".default.", ".")
        torch.testing.assert_close(tau, sft[key] - init[key], rtol=0, atol=0)
        # without φ_init's A: B starts at 0 (τ = B_SFT), A's start is unknown (τ = 0)
        expected = sft[key] if "lora_B" in key else torch.zeros_like(sft[key])
        torch.testing.assert_close(without[name_], expected, rtol=0, atol=0)
    assert all(sft[k].abs().max() > 0.01 for k in sft if "lora_B" in k)  # B_SFT is not zero: τ_B is seen


def test_dpo_continuing_the_sft_adapter_starts_at_the_reference_and_resumes_exactly(tiny_model_dir, adapters,
                                                                                     tmp_path, monkeypatch):
    extra = ["optim.name=ondare_adamw", "optim.reserve_p=0.5", "optim.alpha=0.1", "train.max_steps=4",
             "train.save_steps=2", f"optim.adapter_init={adapters[0]}"]
    train(_cfg(tiny_model_dir, adapters, tmp_path / "straight", *extra))
    train_until_killed(_cfg(tiny_model_dir, adapters, tmp_path / "resumed", *extra), 3, monkeypatch)
    train(_cfg(tiny_model_dir, adapters, tmp_path / "resumed", *extra))
    a, b = (load_file(max((tmp_path / r / "checkpoints").iterdir()) / "trainable.safetensors")
            for r in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    import json
    first = json.loads((tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference = base + φ_SFT at step 0
    final = load_file(tmp_path / "straight" / "final" / "adapter_model.safetensors")
    assert final.keys() == load_file(adapters[1] / "adapter_model.safetensors").keys()


def test_adapter_space_refuses_what_it_cannot_read(tiny_model_dir, adapters, tmp_path):
    with pytest.raises(ConfigError, match="parametrization.init_adapter=<the SFT adapter directory>"):
        TrainingRun(_cfg(tiny_model_dir, adapters, tmp_path / "a", "optim.name=ondare_adamw",
                         "parametrization={kind: full}"))
    with pytest.raises(ConfigError, match="remove optim.base_model"):
        _cfg(tiny_model_dir, adapters, tmp_path / "b", "optim.name=ondare_adamw", f"optim.base_model={tiny_model_dir}")
    with pytest.raises(ConfigError, match="the policy continues, and schedule ofs starts modules"):
        TrainingRun(_cfg(tiny_model_dir, adapters, tmp_path / "c", "schedule=ofs", "optim.name=ondare_adamw"))
    with pytest.raises(ConfigError, match="adapter_init: only adapter_mode adapter_space"):
        _cfg(tiny_model_dir, adapters, tmp_path / "d", "optim.name=ondare_adamw", "optim.adapter_mode=full_only",
             f"optim.base_model={tiny_model_dir}", f"optim.adapter_init={adapters[0]}")
