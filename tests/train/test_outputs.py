"""What a run leaves behind loads with plain transformers / peft, and `export` merges adapters exactly."""

import pytest
import torch
from conftest import sentiment_rows, write_jsonl
from torch.testing import assert_close

from preflab.config import load_config
from preflab.export import ExportError, export_run
from preflab.train import train


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-run")
    data = write_jsonl(root / "d.jsonl", sentiment_rows(8))
    cfg = load_config(None, [f"model.name={tiny_model_dir}", f"data.train={data}", "data.eval=null",
                             f"output_dir={root / 'run'}", "train.max_steps=3", "train.lr=1e-2",
                             "train.progress=false", "parametrization.kind=lora", "parametrization.r=4"])
    train(cfg)
    return root / "run"


def _ids():
    return torch.tensor([[1, 520, 9531, 198, 19556, 665, 2]])


def test_adapter_loads_with_plain_peft_and_export_matches_its_logits(lora_run, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert (lora_run / "final" / "adapter_config.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        base_logits = base(_ids()).logits
    adapted = PeftModel.from_pretrained(base, lora_run / "final").eval()
    with torch.no_grad():
        adapter_logits = adapted(_ids()).logits
    assert not torch.allclose(adapter_logits, base_logits)  # training changed the model
    export_run(lora_run, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        merged_logits = merged(_ids()).logits
    assert_close(merged_logits, adapter_logits, atol=1e-5, rtol=1e-5)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def test_final_names_a_loadable_base_and_carries_a_filled_model_card(lora_run, tiny_model_dir, monkeypatch, tmp_path):
    import json

    from peft import PeftConfig

    from preflab.models.loader import _adapter_base
    from preflab.train.model_card import loadable_base_name

    record = json.loads((lora_run / "final" / "adapter_config.json").read_text())
    assert record["base_model_name_or_path"] == str(tiny_model_dir.resolve())  # not a cache path; absolute
    card = (lora_run / "final" / "README.md").read_text()
    assert card.startswith(f"---\nbase_model: {tiny_model_dir.resolve()}\nlibrary_name: peft\n")
    for line in ("- schedule: `offline`, 3 steps, batch 8 x 1 accumulation, lr 0.01, seed 0",
                 "- objective: `sigmoid` (weight=1.0, logp_normalize=sum, ld_alpha=None, beta=0.1, "
                 "label_smoothing=0.0, f_divergence=reverse_kl, f_alpha=0.5)",
                 "- parametrization: `lora` (r=4, alpha=32.0, dropout=0.0, target_modules=['all-linear'], "
                 "init_adapter=None)",
                 f'base = AutoModelForCausalLM.from_pretrained("{tiny_model_dir.resolve()}")'):
        assert line in card, line
    assert "## Held-out pairs" not in card  # this run has no held-out data
    from preflab.train.model_card import _card

    record = {"before": {"loss": 0.6931, "rewards/accuracies": 0.5}, "after": {"loss": 0.62, "num_pairs": 128,
                                                                               "rewards/accuracies": 0.6641},
              "generation": {"sentiment": {"num_prompts": 100, "gold/reward_ref": 0.3545, "gold/reward": 0.9187,
                                           "gold/win_rate": 0.91, "gold/kl": 13.3489}}}
    full = _card(load_config(None, ["parametrization.kind=full"]), record, 32, "b", adapter=False)
    for line in ("## Held-out pairs (128)", "| loss | 0.6931 | 0.6200 |", "| preference accuracy (implicit reward) | "
                 "0.5000 | 0.6641 |", "## Generations: task `sentiment` (100 held-out prompts)",
                 "| gold reward | 0.3545 | 0.9187 |", "| win rate vs reference | 0.5 | 0.9100 |",
                 "| KL(policy ‖ reference) | 0 | 13.3489 |", "library_name: transformers",
                 'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
                 "the Q4_1 GGUF of `b`"):
        assert line in full, line
    assert "reward margin" not in full and "PeftModel" not in full  # absent metrics are not invented
    # the built-in model: its hub source for other machines, the exact built-in for preflab
    assert loadable_base_name("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert loadable_base_name("org/some-model") == "org/some-model"
    monkeypatch.chdir(tiny_model_dir.parent)
    assert loadable_base_name(tiny_model_dir.name) == str(tiny_model_dir.resolve())
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {name: smollm2-135m-instruct}\n")
    hub = PeftConfig(base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
    assert _adapter_base(run / "final", hub) == "smollm2-135m-instruct"
    (run / "config.yaml").write_text("model: {name: org/other}\n")
    assert _adapter_base(run / "final", hub) == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_export_never_overwrites_files_or_writes_into_the_run(lora_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"out is not empty \(it holds notes.txt\).*--overwrite"):
        export_run(lora_run, out)
    assert (out / "notes.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    before = sorted(p.name for p in (lora_run / "final").iterdir())
    for inside in (lora_run / "final", lora_run / "final" / "merged", lora_run):
        with pytest.raises(ExportError, match="is the run's own directory.*adapter counts twice"):
            export_run(lora_run, inside, overwrite=True)
    assert sorted(p.name for p in (lora_run / "final").iterdir()) == before
    (tmp_path / "file").write_text("")
    with pytest.raises(ExportError, match="is a file, not a directory"):
        export_run(lora_run, tmp_path / "file")
    export_run(lora_run, out, overwrite=True)  # an earlier export replaced: asked for by name
    assert (out / "config.json").is_file() and (out / "notes.txt").is_file()
    (tmp_path / "empty").mkdir()
    assert export_run(lora_run, tmp_path / "empty") == tmp_path / "empty"


def test_full_run_final_loads_with_plain_transformers(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(4))
    cfg = load_config(None, [f"model.name={tiny_model_dir}", f"data.train={data}", "data.eval=null",
                             f"output_dir={tmp_path / 'run'}", "train.max_steps=1", "train.progress=false",
                             "parametrization.kind=full", "train.lr=1e-3"])
    train(cfg)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    export_run(tmp_path / "run", tmp_path / "exported")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    assert torch.equal(again.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)
