"""Generation evaluation at the end of a run, and `preflab eval` on a run directory or a model."""

import json

from conftest import sentiment_rows, write_jsonl

from preflab.cli import main
from preflab.config import load_config
from preflab.train import train


def test_run_with_a_task_and_preflab_eval(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(4))
    run = tmp_path / "run"
    result = train(load_config(None, [f"model.name={tiny_model_dir}", f"data.train={data}", "data.eval=null",
                                      f"output_dir={run}", "train.max_steps=1", "train.progress=false",
                                      "eval.task=sentiment", "eval.num_prompts=4", "eval.max_new_tokens=6"]))
    assert result.generation["num_prompts"] == 4
    record = json.loads((run / "eval.json").read_text())
    assert set(record["generation"]) == {"sentiment"}

    code = main(["eval", str(run), "--task", "concision", "--num-prompts", "3", "--max-new-tokens", "5"])
    out = capsys.readouterr().out
    assert code == 0 and "win rate vs reference" in out
    record = json.loads((run / "eval.json").read_text())
    assert set(record["generation"]) == {"sentiment", "concision"}
    assert record["generation"]["concision"]["num_prompts"] == 3

    out_file = tmp_path / "model-eval.json"
    code = main(["eval", str(tiny_model_dir), "--task", "sentiment", "--reference", str(tiny_model_dir),
                 "--num-prompts", "3", "--max-new-tokens", "4", "--out", str(out_file)])
    assert code == 0
    same = json.loads(out_file.read_text())
    assert same["gold/win_rate"] == 0.5 and abs(same["gold/kl"]) < 1e-6  # a model against itself
    assert same["preference"]["num_pairs"] >= 100  # the shipped held-out sentiment pairs


def test_unknown_task_is_a_clear_error(capsys, tiny_model_dir):
    assert main(["eval", str(tiny_model_dir), "--task", "nope"]) == 2
    assert "eval.task: unknown task 'nope'" in capsys.readouterr().err
