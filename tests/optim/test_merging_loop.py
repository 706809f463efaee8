"""Online merging in preflab's loop: SFT stage → DPO with OnDARE/OnTIES against that SFT model, resumed exactly."""

import pytest
import torch
from conftest import sentiment_rows, train_until_killed, write_jsonl
from safetensors.torch import load_file

from preflab.config import ConfigError, load_config
from preflab.train import TrainingRun, train


def _cfg(model, data, out, *extra):
    return load_config(None, [f"model.name={model}", f"data.train={data}", "data.eval=null", f"output_dir={out}",
                              "train.progress=false", "train.warmup_ratio=0", "parametrization.kind=full",
                              "diag.enabled=false", *extra])


@pytest.fixture(scope="module")
def sft_run(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("merging")
    data = write_jsonl(root / "d.jsonl", sentiment_rows(8))
    train(_cfg(tiny_model_dir, data, root / "sft", "loss.name=sft", "train.max_steps=3", "train.lr=1e-3"))
    return root / "sft", data


@pytest.mark.parametrize("name", ["ondare_adamw", "onties_adamw"])
def test_dpo_from_the_sft_model_resumes_exactly(sft_run, tiny_model_dir, tmp_path, monkeypatch, name, caplog):
    sft_dir, data = sft_run
    extra = [f"optim.name={name}", f"optim.base_model={tiny_model_dir}", "optim.reserve_p=0.3", "optim.alpha=0.01",
             "train.max_steps=4", "train.save_steps=2", "train.lr=1e-3"]
    with caplog.at_level("INFO", logger="preflab.optim.online"):
        train(_cfg(sft_dir, data, tmp_path / "straight", *extra))
    assert "task vectors for" in caplog.text and "MB held in the optimizer state" in caplog.text

    train_until_killed(_cfg(sft_dir, data, tmp_path / "resumed", *extra), 3, monkeypatch)
    train(_cfg(sft_dir, data, tmp_path / "resumed", *extra))
    a, b = (load_file(max((tmp_path / run / "checkpoints").iterdir()) / "trainable.safetensors")
            for run in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_has_no_tensor_to_merge(sft_run, tiny_model_dir, tmp_path):
    sft_dir, data = sft_run
    with pytest.raises(ConfigError, match="adapter_mode full_only"):
        train(_cfg(sft_dir, data, tmp_path / "r", "parametrization.kind=lora", "optim.name=ondare_adamw",
                   f"optim.base_model={tiny_model_dir}", "train.max_steps=1"))


@pytest.mark.parametrize("name", ["ondare_adamw", "onties_adamw"])
def test_the_loops_task_vectors_point_from_the_base_to_the_sft_model(sft_run, tiny_model_dir, tmp_path, name):
    """The optimizer the loop builds holds τ = θ_SFT − θ_base for every trained tensor (p = 1: τ̃ = τ)."""
    from preflab.models.loader import load_model

    sft_dir, data = sft_run
    clip = ["optim.clip=1000"] if name == "ondare_adamw" else []  # (OnTIES has no clamp: no clip key)
    run = TrainingRun(_cfg(sft_dir, data, tmp_path / "r", f"optim.name={name}", f"optim.base_model={tiny_model_dir}",
                           "optim.reserve_p=1", "train.max_steps=1", *clip))
    base, sft = load_model(str(tiny_model_dir)).state_dict(), load_model(str(sft_dir)).state_dict()
    state = run.optimizer.optimizer.state if hasattr(run.optimizer, "optimizer") else run.optimizer.state
    checked = 0
    for key, param in run.param.model.named_parameters():
        if param.requires_grad and key in sft:
            torch.testing.assert_close(state[param]["tau"], sft[key] - base[key], rtol=0, atol=1e-7)
            checked += 1
    assert checked > 0 and any((sft[k] - base[k]).abs().max() > 1e-4 for k in sft)


def test_ofs_with_a_full_pair_merges_each_module_with_the_task_vector(sft_run, tiny_model_dir, tmp_path):
    """OFS-DPO over two full fine-tuning modules with OnDARE: each module's tensors carry τ = θ_SFT − θ_base."""
    from preflab.models.loader import load_model

    sft_dir, data = sft_run
    run = TrainingRun(_cfg(sft_dir, data, tmp_path / "r", "schedule=ofs", "optim.name=ondare_adamw",
                           f"optim.base_model={tiny_model_dir}", "optim.reserve_p=1", "optim.clip=1000",
                           "train.max_steps=2", "ofs.swap_interval=1", "train.lr=1e-3"))
    base, sft = load_model(str(tiny_model_dir)).state_dict(), load_model(str(sft_dir)).state_dict()
    state = run.optimizer.optimizer.state if hasattr(run.optimizer, "optimizer") else run.optimizer.state
    for module in ("fast", "slow"):
        named = dict(run.param.modules[module].model.named_parameters())
        assert named and all("tau" in state[p] for p in named.values())
        key = "model.layers.0.self_attn.q_proj.weight"
        torch.testing.assert_close(state[named[key]]["tau"], sft[key] - base[key], rtol=0, atol=1e-7)
    result = run.run()
    assert result.steps == 2 and (tmp_path / "r" / "final" / "model.safetensors").is_file()
