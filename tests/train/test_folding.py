"""``parametrization.init_adapter`` under the schedules that start modules of their own (OFS, APO, COFS): the SFT
adapter is folded into the weights once (``<output_dir>/start/``) and the run is the same run on those weights."""

import json

import pytest
import torch
from conftest import make_tiny_model, sentiment_rows, write_jsonl
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from preflab.config import ConfigError, load_config
from preflab.train import train
from preflab.train.compat import check_compatible

OFS = ["schedule=ofs", "ofs.swap_interval=1", "ofs.fused_forward=true", "parametrization.dropout=0"]
APO = ["schedule=apo", "apo.task=concision", "apo.iterations=2", "apo.prompts_per_iteration=4", "apo.k=3",
       "apo.max_new_tokens=8", "apo.batch_prompts=4", "apo.min_score_gap=-1", "apo.alpha=0.3", "train.max_steps=1"]


@pytest.fixture()
def sft(tiny_model_dir, tmp_path):
    """An "SFT" LoRA adapter on the tiny model (B ≠ 0), and the same adapter merged by hand with PEFT."""
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                          LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    peft.save_pretrained(tmp_path / "adapter")
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter")
    merged.merge_and_unload().save_pretrained(tmp_path / "by-hand")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "by-hand")
    return tmp_path / "adapter", tmp_path / "by-hand"


def _args(model, out, data, *extra):
    return [f"model.name={model}", f"data.train={data}", "data.eval=null", f"output_dir={out}", "eval.task=null",
            "train.progress=false", "train.warmup_ratio=0", "diag.enabled=false", "train.batch_size=3",
            "train.lr=1e-2", "train.max_steps=2", "parametrization={kind: lora, r: 4, alpha: 8}", *extra]


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_ofs_from_an_sft_adapter_is_ofs_on_the_folded_weights(tiny_model_dir, sft, tmp_path, tokenizer):
    adapter, by_hand = sft
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(6))
    folded_run, hand_run = tmp_path / "folded", tmp_path / "hand"
    train(load_config(None, _args(tiny_model_dir, folded_run, data, *OFS, f"parametrization.init_adapter={adapter}")))
    train(load_config(None, _args(by_hand, hand_run, data, *OFS)))
    assert _losses(folded_run) == _losses(hand_run)
    assert _losses(folded_run)[0] == pytest.approx(0.6931, abs=1e-4)  # both modules start as the SFT policy
    start = folded_run / "start"
    assert json.loads((start / "folded.json").read_text()) == {"model": str(tiny_model_dir),
                                                               "init_adapter": str(adapter)}
    # the folded weights are the base with the adapter: the same function as PEFT's adapter model
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        from transformers import AutoModelForCausalLM

        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter).eval()
        folded = AutoModelForCausalLM.from_pretrained(start).eval()
        base = make_tiny_model(tokenizer)
        assert torch.allclose(folded(input_ids=ids).logits, peft(input_ids=ids).logits, atol=1e-5)
        assert not torch.allclose(folded(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-3)
    recorded = load_config(folded_run / "config.yaml")
    assert recorded.model.name == str(start) and recorded.parametrization.params.init_adapter is None

    weights = load_file(start / "model.safetensors")
    train(load_config(None, _args(tiny_model_dir, folded_run, data, *OFS, "train.max_steps=3",
                                  f"parametrization.init_adapter={adapter}")))  # resumed: folded before, reused
    assert all(torch.equal(v, load_file(start / "model.safetensors")[k]) for k, v in weights.items())
    with pytest.raises(ConfigError, match=r"parametrization.init_adapter: .*start holds the start of a run from"):
        train(load_config(None, _args(by_hand, folded_run, data, *OFS, "train.max_steps=4",
                                      f"parametrization.init_adapter={adapter}")))


def test_apo_from_an_sft_adapter_samples_starts_and_extrapolates_from_the_folded_weights(tiny_model_dir, sft,
                                                                                         tmp_path):
    adapter, by_hand = sft
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(6))
    folded_run, hand_run = tmp_path / "folded", tmp_path / "hand"
    train(load_config(None, _args(tiny_model_dir, folded_run, data, *APO, f"parametrization.init_adapter={adapter}")))
    train(load_config(None, _args(by_hand, hand_run, data, *APO)))
    for t in ("iter-1", "iter-2"):
        assert (folded_run / t / "pairs" / "train.jsonl").read_text() == (hand_run / t / "pairs" / "train.jsonl"
                                                                          ).read_text()
        assert _losses(folded_run / t / "train") == _losses(hand_run / t / "train")
    first = load_config(folded_run / "iter-1" / "train" / "config.yaml")
    assert first.model.name == str(folded_run / "start") and first.parametrization.params.init_adapter is None
    a, b = load_file(folded_run / "final" / "model.safetensors"), load_file(hand_run / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cofs_from_an_sft_adapter_is_cofs_on_the_folded_weights(tiny_model_dir, sft, tmp_path):
    adapter, by_hand = sft
    a = write_jsonl(tmp_path / "a.jsonl", sentiment_rows(6))
    b = write_jsonl(tmp_path / "b.jsonl", sentiment_rows(6, 100))
    cofs = ["schedule=cofs", f"data.domains=[{{name: a, train: {a}, eval: {a}}}, {{name: b, train: {b}, eval: {b}}}]",
            "cofs.buffer_size=4", "cofs.grid_step=0.5", "train.max_steps=1"]
    folded_run, hand_run = tmp_path / "folded", tmp_path / "hand"
    train(load_config(None, _args(tiny_model_dir, folded_run, a, *cofs, f"parametrization.init_adapter={adapter}")))
    train(load_config(None, _args(by_hand, hand_run, a, *cofs)))
    files = sorted(p.relative_to(hand_run) for p in hand_run.rglob("*.safetensors") if "checkpoint" not in str(p))
    assert files and files == sorted(p.relative_to(folded_run) for p in folded_run.rglob("*.safetensors")
                                     if "checkpoint" not in str(p) and "start" not in p.parts)
    for f in files:
        x, y = load_file(folded_run / f), load_file(hand_run / f)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f


def test_the_merging_optimizers_in_adapter_space_stay_with_the_offline_schedule(tmp_path):
    config = load_config(None, [f"output_dir={tmp_path}", "schedule=ofs",
                                f"parametrization={{kind: lora, init_adapter: {tmp_path}}}",
                                "optim={name: ondare_adamw, adapter_mode: adapter_space}"])
    with pytest.raises(ConfigError, match="adapter_space merges with the SFT adapter the policy continues, and "
                                          "schedule ofs starts modules of its own"):
        check_compatible(config)
