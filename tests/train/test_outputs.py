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
