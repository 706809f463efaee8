"""`preflab report`: a self-contained page with every plot embedded; rendered in headless Chromium if present."""

import base64
import re
import shutil
import subprocess

import pytest
from conftest import sentiment_rows, write_jsonl

from preflab.cli import main
from preflab.config import load_config
from preflab.train import train


@pytest.fixture(scope="module")
def two_runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    data = write_jsonl(root / "d.jsonl", sentiment_rows(8))
    runs = []
    for name, loss in (("dpo", "sigmoid"), ("flex", "flex")):
        train(load_config(None, [f"model.name={tiny_model_dir}", f"data.train={data}", f"data.eval={data}",
                                 f"output_dir={root / name}", f"loss.name={loss}", "train.max_steps=3",
                                 "train.batch_size=4", "train.lr=1e-2", "train.progress=false", "diag.seen_pairs=4",
                                 "diag.probe_prompts=2", "diag.probe_samples=1", "diag.probe_max_new_tokens=4"]))
        runs.append(root / name)
    return runs


def test_page_embeds_every_plot(two_runs, tmp_path, capsys):
    out = tmp_path / "report.html"
    assert main(["report", *map(str, two_runs), "--out", str(out)]) == 0
    page = out.read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) >= 8  # loss, margins, accuracies, log-probs, 3 x 3D, gradient ratio, held-out
    assert all(base64.b64decode(b64)[:8] == b"\x89PNG\r\n\x1a\n" for b64 in images)
    assert "<td>dpo</td>" in page and "<td>flex</td>" in page and "src=\"http" not in page


def test_missing_run_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_page_renders_in_headless_chromium(two_runs, tmp_path):
    import matplotlib.image

    out = tmp_path / "report.html"
    main(["report", *map(str, two_runs), "--out", str(out)])
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,1800", f"--screenshot={shot}",
                    out.as_uri()], check=True, timeout=120, capture_output=True)
    pixels = matplotlib.image.imread(shot)[..., :3]
    blue = (abs(pixels[..., 0] - 0x1F / 255) < 0.08) & (abs(pixels[..., 1] - 0x77 / 255) < 0.08) & (
        abs(pixels[..., 2] - 0xB4 / 255) < 0.08)
    orange = (abs(pixels[..., 0] - 0xFF / 255) < 0.08) & (abs(pixels[..., 1] - 0x7F / 255) < 0.08) & (
        pixels[..., 2] < 0.2)
    assert blue.sum() > 500 and orange.sum() > 500  # both runs' curves are drawn on the page
