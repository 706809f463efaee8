"""The command line: user errors end in one clear line and exit code 2, never a traceback."""

import re

import pytest
from conftest import write_jsonl

from preflab.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_config_prints_the_resolved_tree(capsys):
    code, out, _ = _run(capsys, "config", "train.lr=2e-4")
    assert code == 0 and "lr: 0.0002" in out


@pytest.mark.parametrize("argv,message", [
    (("config", "train.lrr=1"), "did you mean 'lr'"),
    (("train", "missing.yaml"), "config file missing.yaml does not exist"),
    (("train", "data.train=/nonexistent/file.jsonl", "model.name=/nonexistent/model"), "does not exist"),
    (("export", "/nonexistent/run", "/tmp/out"), "does not exist"),
    (("train",), "train: give a config file (for example configs/dpo.yaml) and/or key=value overrides; --defaults"),
    (("train", "--defaults", "configs/dpo.yaml"), "--defaults and the config file configs/dpo.yaml: give one"),
])
def test_user_errors_exit_2_with_one_line(capsys, argv, message):
    code, _, err = _run(capsys, *argv)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert err.startswith("preflab: error:")


def test_config_changed_prints_what_differs_from_the_defaults_of_the_same_choices(capsys):
    code, out, _ = _run(capsys, "config", "--changed", "configs/dpo.yaml", "train.batch_size=4")
    lines = out.splitlines()
    assert code == 0 and "train.lr: 0.0005 -> 0.001" in lines and "train.batch_size: 8 -> 4" in lines
    assert "eval.task: None -> 'sentiment'" in lines and not any(line.startswith(("schedule", "loss", "optim",
                                                                                   "ofs.")) for line in lines)
    code, out, _ = _run(capsys, "config", "--changed", "parametrization.kind=ropo", "schedule=ofs",
                        "loss=[{name: sigmoid, beta: 0.2}, {name: sft, weight: 0.1}]")
    assert out.splitlines() == ["schedule: 'offline' -> 'ofs'", "parametrization.kind: 'lora' -> 'ropo'",
                                "loss: sigmoid -> sigmoid + sft", "loss.0.beta: 0.1 -> 0.2",
                                "loss.1.weight: 1.0 -> 0.1"]
    assert _run(capsys, "config", "--changed")[1] == "(every setting is the default)\n"


def test_train_help_says_where_the_keys_are(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "preflab config CONFIG [key=value ...]   prints every key the run reads" in out
    assert "README.md" in out and "--defaults" in out


def test_bad_data_row_names_file_row_and_field(capsys, tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"},
                                               {"prompt": "p", "chosen": "", "rejected": "b"}])
    code, _, err = _run(capsys, "train", f"model.name={tiny_model_dir}", f"data.train={data}", "data.eval=null",
                        f"output_dir={tmp_path / 'run'}")
    assert code == 2
    assert f"{data} row 2: field 'chosen': empty response" in err


def test_ropo_factors_that_do_not_divide_a_layer_stop_before_any_work(capsys, tmp_path, tiny_model_dir):
    from preflab.config import ConfigError, load_config
    from preflab.train import train

    argv = [f"model.name={tiny_model_dir}", "parametrization.kind=ropo", "parametrization.factors=[[2, 1], [3, 1]]",
            f"output_dir={tmp_path / 'run'}"]
    code, out, err = _run(capsys, "config", *argv)
    message = ("parametrization.factors: factor (3, 1) needs in_features divisible by 3; "
               "layer model.layers.0.self_attn.q_proj has in_features=32")
    assert code == 2 and message in err and out == ""
    with pytest.raises(ConfigError, match=re.escape(message)):
        train(load_config(None, argv))
    assert not (tmp_path / "run").exists()  # nothing written, no data read
