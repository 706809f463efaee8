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
