"""The model loader: built-in name, directories, run directories and clear errors."""

import time

import pytest

from preflab.models.loader import DEFAULT_MODEL, ModelNotFoundError, load_model, resolve


def test_builtin_resolves_to_a_cached_plain_checkpoint():
    first = resolve(DEFAULT_MODEL)  # de-quantizes on the very first use, then it is cached
    t0 = time.perf_counter()
    again = resolve(DEFAULT_MODEL)
    assert time.perf_counter() - t0 < 1.0 and again == first
    import json
    from pathlib import Path

    config = json.loads((Path(first.source) / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert (Path(first.source) / "model.safetensors").is_file()


@pytest.mark.slow
def test_builtin_model_loads_fast_from_the_cache():
    resolve(DEFAULT_MODEL)
    t0 = time.perf_counter()
    model = load_model(DEFAULT_MODEL)
    assert time.perf_counter() - t0 < 10
    assert model.config.num_hidden_layers == 30 and getattr(model, "hf_quantizer", None) is None
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)


def test_directories_and_run_directories(tiny_model_dir, tmp_path):
    assert resolve(str(tiny_model_dir)).source == str(tiny_model_dir)
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "config.json").write_text("{}")
    assert resolve(str(run)).source == str(run / "final")


@pytest.mark.parametrize("name,message", [("./does/not/exist", "does not exist"), ("/no/such.gguf", "does not exist")])
def test_missing_paths_are_clear_errors(name, message):
    with pytest.raises(ModelNotFoundError, match=message):
        resolve(name)


def test_directory_without_a_model(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve(str(tmp_path))


def test_unknown_dtype():
    with pytest.raises(ValueError, match="model.dtype"):
        load_model(DEFAULT_MODEL, dtype="float8")


@pytest.mark.parametrize("text,expected", [(None, None), ("model:\n  name: smollm2-135m-instruct\n", DEFAULT_MODEL),
                                           ("model: {name: /models/base}\nseed: 0\n", "/models/base")])
def test_a_run_directory_names_its_base_model(tmp_path, text, expected):
    """export, evaluate and the adapter loader read a run's model.name through this one helper."""
    from preflab.models.loader import run_model_name

    if text is not None:
        (tmp_path / "config.yaml").write_text(text)
    assert run_model_name(tmp_path) == expected


@pytest.mark.parametrize("text", ["seed: 0\n", "model: [1, 2]\n", "model: {name: [unclosed\n"])
def test_a_run_config_without_a_readable_model_name_is_named(tmp_path, text):
    from preflab.cli import main
    from preflab.models.loader import run_model_name

    (tmp_path / "config.yaml").write_text(text)
    with pytest.raises(ModelNotFoundError, match=f"{tmp_path / 'config.yaml'}: cannot read the run's model.name"):
        run_model_name(tmp_path)
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "adapter_config.json").write_text("{}")
    assert main(["export", str(tmp_path), str(tmp_path.parent / "out")]) == 2  # one line, not a KeyError
