"""Config: YAML + dotted overrides → typed tree; every user mistake is named before any work starts."""

from pathlib import Path

import pytest

from preflab.config import ConfigError, dump_config, load_config, load_yaml

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def test_defaults_and_overrides_are_typed():
    c = load_config(None, ["train.lr=1e-4", "loss.beta=0.2", "train.max_steps=5", "train.report_to=[tensorboard]",
                           "parametrization.target_modules=[q_proj,v_proj]", "data.max_prompt_length=null"])
    assert c.train.lr == 1e-4 and isinstance(c.train.lr, float)
    assert c.loss[0].name == "sigmoid" and c.loss[0].params.beta == 0.2
    assert c.train.max_steps == 5 and c.train.report_to == ("tensorboard",)
    assert c.parametrization.params.target_modules == ("q_proj", "v_proj")
    assert c.data.max_prompt_length is None


def test_loss_list_and_indexed_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loss:\n  - {name: sigmoid, beta: 0.1}\n  - {name: sft, weight: 0.5}\n")
    c = load_config(path, ["loss.1.weight=0.2"])
    assert [t.name for t in c.loss] == ["sigmoid", "sft"] and c.loss[1].params.weight == 0.2


@pytest.mark.parametrize("override,message", [
    ("train.lrr=1", "train.lrr: unknown key.*did you mean 'lr'"),
    ("trian.lr=1", "trian: unknown key.*did you mean 'train'"),
    ("train.batch_size=abc", "train.batch_size: expected an integer, got 'abc'"),
    ("train.batch_size=0", "train.batch_size: must be >= 1"),
    ("loss.name=sigmod", "loss.name: unknown name 'sigmod'.*did you mean 'sigmoid'"),
    ("loss.beta=-1", "loss.beta: must be > 0"),
    ("loss.bta=1", "loss.bta: unknown key.*did you mean 'beta'"),
    ("data.on_error=maybe", r"data.on_error: expected one of \['strict', 'skip'\]"),
    ("train.precision=fp8", "train.precision: expected one of"),
    ("parametrization.kind=ful", "parametrization.kind: unknown kind 'ful'.*did you mean 'full'"),
    ("parametrization.r=0", "parametrization.r: must be >= 1"),
    ("train.gradient_checkpointing=maybe", "train.gradient_checkpointing: expected true or false"),
    ("data.max_prompt_length=600", "data.max_prompt_length: must be in"),
    ("train.lr.x=1", "train.lr: expected a number"),
    ("train.lr=nan", "train.lr: expected a finite number, got 'nan'"),  # AdamW would crash on it, inf at step 2
    ("train.lr=.inf", "train.lr: expected a finite number, got inf"),
    ("loss.beta=-.inf", "loss.beta: expected a finite number"),
    ("train.max_grad_norm=inf", "train.max_grad_norm: expected a finite number"),  # (null: no clipping)
    ("train.max_grad_norm=abc", "train.max_grad_norm: expected a number, got 'abc'"),  # (an optional number)
    ("noequals", "expected key.sub=value"),
    ("optim.reserve_p=0.1", r"optim.reserve_p: unknown key; this section has none \(no settings of its own: .* train"),
])
def test_mistakes_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    # a section (or a key) given twice: plain YAML would keep the last one and drop the first silently
    (tmp_path / "twice.yaml").write_text("train:\n  lr: 1.0e-4\nloss:\n  beta: 0.2\ntrain:\n  max_steps: 3\n")
    with pytest.raises(ConfigError, match=r"(?s)twice.yaml: not valid YAML: .*key 'train' "
                                          r"appears twice \(first on line 1\).*line 5"):
        load_config(tmp_path / "twice.yaml")
    (tmp_path / "inner.yaml").write_text("train:\n  lr: 1.0e-4\n  lr: 2.0e-4\n")
    with pytest.raises(ConfigError, match="key 'lr' appears twice"):
        load_config(tmp_path / "inner.yaml")
    (tmp_path / "anchors.yaml").write_text("base: &b {lr: 1.0e-4, max_steps: 2}\ntrain: {<<: *b, lr: 2.0e-4}\n")
    assert load_yaml(tmp_path / "anchors.yaml")["train"] == {"lr": 2.0e-4, "max_steps": 2}  # a merge key overridden
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(tmp_path / "list.yaml")


def test_a_component_switched_on_the_command_line_drops_the_settings_of_the_other_choice(caplog):
    lora = Path(__file__).resolve().parent.parent / "configs" / "dpo.yaml"  # kind: lora, r, alpha, dropout
    with caplog.at_level("WARNING", logger="preflab.config"):
        c = load_config(lora, ["parametrization.kind=ropo", "parametrization.factors=[[2, 1]]"])
    assert c.parametrization.name == "ropo" and c.parametrization.params.factors == ((2, 1),)
    assert c.parametrization.params.target_modules == ("all-linear",)  # a setting both kinds have is kept
    assert "settings of kind lora (r, alpha, dropout) do not apply to ropo and are dropped" in caplog.text
    with pytest.raises(ConfigError, match="parametrization.r: unknown key"):  # given on the command line: refused
        load_config(lora, ["parametrization.kind=ropo", "parametrization.r=4"])
    flex = load_config(lora, ["loss.name=flex"])  # the recipe's loss.beta: Flex-DPO has beta_chosen/_rejected
    assert flex.loss[0].name == "flex" and flex.loss[0].params.beta_chosen == 0.1
    with pytest.raises(ConfigError, match="loss.beta: unknown key"):
        load_config(lora, ["loss.name=flex", "loss.beta=0.3"])
    terms = load_config(None, ["loss=[{name: sigmoid, beta: 0.2}, {name: sft, weight: 0.1}]", "loss.0.name=ipo"])
    assert [t.name for t in terms.loss] == ["ipo", "sft"]


def test_resolved_config_round_trips(tmp_path):
    c = load_config(None, ["loss.name=flex", "loss.beta_rejected=0.05", "parametrization.kind=dora"])
    dump_config(c, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == c


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_starts_with_a_comment(path):
    load_config(path)
    assert path.read_text().startswith("#")


def test_the_required_recipes_exist():
    names = {p.name for p in CONFIGS}
    assert {"dpo.yaml", "full_dpo.yaml"} <= names
