"""The README's "Python API" examples run as written (in a fresh process: a library run's logging is the CLI's)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def python_api_blocks() -> list[str]:
    section = (ROOT / "README.md").read_text().split("### Python API\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_the_readme_has_the_three_examples():
    blocks = python_api_blocks()
    assert len(blocks) == 3
    assert "train(config)" in blocks[0] and "score_pairs(" in blocks[1] and "build_objective(" in blocks[2]


@pytest.mark.slow
def test_python_api_examples_run_and_a_library_run_logs_like_the_cli(tmp_path):
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    script = tmp_path / "examples.py"
    script.write_text("\n".join(python_api_blocks()))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout.splitlines()
    assert out[0].startswith("runs/api-dpo 2 ")  # the run directory, its steps, the held-out accuracy
    assert (tmp_path / "runs/api-dpo/final/adapter_config.json").is_file()
    assert re.fullmatch(r"tensor\(\[-\d+\.\d+\]\) tensor\(\[-\d+\.\d+\]\) tensor\(\[\d+\.\]\)", out[1])
    # train() from Python logs the CLI's lines, one plain line per logging step (stderr is a pipe, not a TTY)
    err = done.stderr
    assert "INFO parametrization lora:" in err and "INFO data: builtin:sentiment[train]: 4 pairs" in err
    assert re.search(r"^INFO train 1/2 steps: loss=0\.6931 .*\n(.*\n)*INFO train 2/2 steps: loss=", err, re.M)
    assert "\r" not in err and "Loading weights" not in err
