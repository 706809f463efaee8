"""``preflab report RUN_DIR [RUN_DIR ...]``: one self-contained HTML page comparing runs.

Reads each run's ``metrics.jsonl``, ``eval.json`` and ``config.yaml``; draws the training curves (loss,
margins, accuracies, log-probs), the 3D diagnostics (log-ratios of chosen, rejected and probe responses)
and the held-out evaluations over steps, every run overlaid; embeds the plots as PNG data so the page
needs nothing beside it.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import yaml

PANELS = [  # (title, [(metric, style)], y scale)
    ("loss", [("loss", "-")], "linear"),
    ("reward margin (β·h)", [("rewards/margins", "-")], "linear"),
    ("preference accuracy (batch)", [("rewards/accuracies", "-")], "linear"),
    ("policy log-probs (chosen —, rejected --)", [("logps/chosen", "-"), ("logps/rejected", "--")], "linear"),
    ("3D: batch log-ratio ρ (chosen —, rejected --)", [("3d/logratio_chosen", "-"),
                                                       ("3d/logratio_rejected", "--")], "linear"),
    ("3D: seen pairs ρ (chosen —, rejected --)", [("3d/seen_chosen", "-"), ("3d/seen_rejected", "--")], "linear"),
    ("3D: dispersion probe ρ (unseen responses)", [("3d/probe_logratio", "-")], "linear"),
    ("3D: log gradient ratio log|∂ℓ/∂π⁻|/|∂ℓ/∂π⁺|", [("3d/log_grad_ratio", "-")], "linear"),
    ("hyperspherical energy drift |HE−HE₀|/HE₀ (mean —, max --)", [("he/drift_mean", "-"), ("he/drift_max", "--")],
     "log"),
]


def read_run(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"report: {metrics_path} does not exist (is {run_dir} a preflab run directory?)")
    records = []
    for number, line in enumerate(metrics_path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise FileNotFoundError(f"report: {metrics_path} line {number} is not JSON") from None
    evals = json.loads((run_dir / "eval.json").read_text()) if (run_dir / "eval.json").is_file() else {}
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    return {"name": run_dir.name or str(run_dir), "records": records, "eval": evals, "config": config}


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return base64.b64encode(buf.getvalue()).decode()


def _curve_plots(runs: list[dict]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = []
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for title, series, scale in PANELS:
        if not any(key in r for run in runs for r in run["records"] for key, _ in series):
            continue
        fig, ax = plt.subplots(figsize=(5.2, 3.2))
        for i, run in enumerate(runs):
            for key, style in series:
                points = [(r["step"], r[key]) for r in run["records"] if key in r]
                if points:
                    xs, ys = zip(*points)
                    ax.plot(xs, ys, style, color=colors[i % len(colors)], linewidth=1.3,
                            label=run["name"] if style == "-" else None)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_yscale(scale)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
        fig.tight_layout()
        images.append((title, _png(fig)))
        plt.close(fig)
    history = [(run, ([{"step": 0, **run["eval"]["before"]}] if run["eval"].get("before") else [])
                + (run["eval"].get("history") or [])) for run in runs]
    if any(h for _, h in history):
        fig, ax = plt.subplots(figsize=(5.2, 3.2))
        for i, (run, hist) in enumerate(history):
            if hist:
                ax.plot([h["step"] for h in hist], [h["rewards/accuracies"] for h in hist], "o-",
                        color=colors[i % len(colors)], label=run["name"])
        ax.set_title("held-out preference accuracy", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.legend(fontsize=7)
        fig.tight_layout()
        images.append(("held-out preference accuracy", _png(fig)))
        plt.close(fig)
    return images


def _summary_rows(run: dict) -> list[str]:
    ev, cfg = run["eval"], run["config"]
    loss = cfg.get("loss") or [{}]
    last = run["records"][-1] if run["records"] else {}
    steps = str(last.get("step", 0)) + (f" ({last['nonfinite_skips']} skipped: non-finite)"
                                        if last.get("nonfinite_skips") else "")
    cells = [run["name"], str((cfg.get("parametrization") or {}).get("kind", "?")),
             " + ".join(str(t.get("name")) for t in loss), steps]
    before, after = ev.get("before") or {}, ev.get("after") or {}
    for key in ("loss", "rewards/accuracies", "3d/logratio_chosen", "3d/logratio_rejected"):
        b, a = before.get(key), after.get(key)
        cells.append(f"{b:.4f} → {a:.4f}" if b is not None and a is not None else "–")
    gen = next(iter((ev.get("generation") or {}).values()), None)
    cells.append(f"{gen['gold/reward_ref']:.3f} → {gen['gold/reward']:.3f} (win {gen['gold/win_rate']:.2f}, "
                 f"KL {gen['gold/kl']:.2f})" if gen else "–")
    return cells


def write_report(run_dirs: list[str | Path], out: str | Path) -> Path:
    runs = [read_run(Path(d)) for d in run_dirs]
    images = _curve_plots(runs)
    head = ["run", "parametrization", "objective", "steps", "held-out loss", "held-out accuracy",
            "held-out ρ chosen", "held-out ρ rejected", "gold reward (win rate, KL)"]
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _summary_rows(r)) + "</tr>" for r in runs)
    figures = "".join(f'<figure><img alt="{html.escape(t)}" src="data:image/png;base64,{b64}">'
                      f"<figcaption>{html.escape(t)}</figcaption></figure>" for t, b64 in images)
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>preflab report</title>
<style>body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;font-size:13px}} figure{{display:inline-block;margin:6px}}
figcaption{{font-size:11px;color:#555}}</style></head>
<body><h1>preflab report</h1>
<p>{len(runs)} run(s): {html.escape(", ".join(str(d) for d in run_dirs))}</p>
<table><tr>{"".join(f"<th>{h}</th>" for h in head)}</tr>{rows}</table>
<div class="plots">{figures}</div>
</body></html>
"""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
