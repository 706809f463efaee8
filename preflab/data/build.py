"""Build preference pairs from a model's own samples, ranked by a gold reward.

For every prompt of a task split: sample ``k`` responses, score each with the task's reward, keep the best
and the worst as a pair when their score gap is at least ``min_gap`` (ties and near-ties dropped).

Work is done in fixed batches of prompts; each finished batch is appended to ``<split>.samples.jsonl`` in
one write and flushed, so an interrupted build resumes at the first unfinished batch and loses nothing.
Batch ``i`` is sampled with seed ``seed * 1_000_003 + i``: the result does not depend on interruptions.
"""

from __future__ import annotations

import inspect
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..console import progress as progress_of
from ..models.generate import SamplingConfig, sample_responses
from ..rewards import get_reward
from ..tasks import get_task
from .dataset import DataError


@dataclass(frozen=True)
class BuildConfig:
    task: str
    split: str = "train"
    model: str = "smollm2-135m-instruct"
    num_prompts: int | None = None  # None: every prompt of the split (from offset)
    offset: int = 0  # first prompt of the split used (iterative schedules take disjoint slices)
    k: int = 4
    min_gap: float = 0.3
    batch_prompts: int = 16
    seed: int = 0  # orders the task's prompts and, unless sample_seed is set, seeds the sampling
    sample_seed: int | None = None
    reward: str | None = None  # a reward name or rm:PATH; None: the task's gold reward
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


def _read_done(samples_path: Path) -> dict[int, list[dict]]:
    """Finished batches in a samples file; a torn last line (crash mid-write) is cut off the file."""
    done: dict[int, list[dict]] = {}
    if not samples_path.exists():
        return done
    good_bytes = 0
    with samples_path.open("rb") as f:
        for raw in f:
            try:
                rec = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                break
            done[rec["batch"]] = rec["items"]
            good_bytes += len(raw)
    if good_bytes < samples_path.stat().st_size:
        with samples_path.open("r+b") as f:
            f.truncate(good_bytes)
    return done


def _pair_rows(cfg: BuildConfig, items: list[dict]) -> list[dict]:
    rows = []
    for item in items:
        cands = [(s, r) for r, s in zip(item["responses"], item["scores"]) if r.strip()]
        if len(cands) < 2:
            continue
        best = max(cands, key=lambda c: c[0])
        worst = min(cands, key=lambda c: c[0])
        gap = best[0] - worst[0]
        if gap <= 0 or gap < cfg.min_gap or best[1] == worst[1]:  # ties never make a pair
            continue
        rows.append({
            "id": f"{cfg.task}-{cfg.split}-{item['index']}",
            "prompt": [{"role": "user", "content": item["prompt"]}],
            "chosen": [{"role": "assistant", "content": best[1]}],
            "rejected": [{"role": "assistant", "content": worst[1]}],
            "score_chosen": best[0],
            "score_rejected": worst[0],
            "domain": cfg.task,
        })
    return rows


def build_pairs(cfg: BuildConfig, out_dir: str | Path, model=None, tokenizer=None, progress: bool = True) -> dict:
    """Run (or resume) a build; writes ``<split>.samples.jsonl`` and ``<split>.jsonl``; returns stats."""
    from ..models.loader import load_model, load_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    task = get_task(cfg.task)
    end = None if cfg.num_prompts is None else cfg.offset + cfg.num_prompts
    prompts = task.prompts(cfg.split, cfg.seed)[cfg.offset:end]
    if not prompts:
        raise DataError(f"task {cfg.task!r} split {cfg.split!r} has no prompts from offset {cfg.offset}")
    sample_seed = cfg.seed if cfg.sample_seed is None else cfg.sample_seed
    reward = task.make_reward() if cfg.reward is None else get_reward(cfg.reward)
    samples_path = out / f"{cfg.split}.samples.jsonl"
    done = _read_done(samples_path)
    batches = [prompts[i:i + cfg.batch_prompts] for i in range(0, len(prompts), cfg.batch_prompts)]
    for b, items in done.items():
        if b >= len(batches) or [it["prompt"] for it in items] != batches[b]:
            raise DataError(f"{samples_path} was built with other prompts or batch size (batch {b} differs); "
                             "remove it or build into another directory")
    todo = [b for b in range(len(batches)) if b not in done]
    t0 = time.time()
    if todo:
        tokenizer = tokenizer or load_tokenizer(cfg.model)
        model = model or load_model(cfg.model)
        with samples_path.open("a", encoding="utf-8") as f:
            for b in progress_of(todo, desc=f"build {cfg.task}/{cfg.split}", unit="batches", enabled=progress):
                responses = sample_responses(
                    model, tokenizer, batches[b], cfg.k, cfg.sampling, seed=sample_seed * 1_000_003 + b
                )
                items = []
                for j, (p, rs) in enumerate(zip(batches[b], responses)):
                    scores = reward([p] * len(rs), rs)
                    items.append({"index": cfg.offset + b * cfg.batch_prompts + j, "prompt": p, "responses": rs,
                                  "scores": scores})
                f.write(json.dumps({"batch": b, "items": items}, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
                done[b] = items
    items = [it for b in sorted(done) if b < len(batches) for it in done[b]]
    rows = _pair_rows(cfg, items)
    tmp = out / f".{cfg.split}.jsonl.tmp"
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, out / f"{cfg.split}.jsonl")
    stats = _stats(cfg, items, rows)
    stats["seconds_this_run"] = round(time.time() - t0, 1)
    (out / f"{cfg.split}.stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def _describe(xs: list[float]) -> dict:
    if not xs:
        return {}
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return {"mean": round(statistics.fmean(xs), 4), "q25": round(q[0], 4), "median": round(q[1], 4),
            "q75": round(q[2], 4), "min": round(min(xs), 4), "max": round(max(xs), 4)}


def _stats(cfg: BuildConfig, items: list[dict], rows: list[dict]) -> dict:
    all_scores = [s for it in items for s in it["scores"]]
    return {
        "config": asdict(cfg),
        "prompts": len(items),
        "samples": len(all_scores),
        "pairs": len(rows),
        "yield": round(len(rows) / max(len(items), 1), 4),
        "score_all_samples": _describe(all_scores),
        "score_chosen": _describe([r["score_chosen"] for r in rows]),
        "score_rejected": _describe([r["score_rejected"] for r in rows]),
        "score_gap": _describe([r["score_chosen"] - r["score_rejected"] for r in rows]),
    }


def write_data_card(out_dir: str | Path, task: str, splits: tuple[str, ...] = ("train", "eval")) -> Path:
    """``README.md`` beside the built files: how they were built and the score distributions, from the stats."""
    out = Path(out_dir)
    stats = {s: json.loads((out / f"{s}.stats.json").read_text())
             for s in splits if (out / f"{s}.stats.json").is_file()}
    task_obj = get_task(task)
    reward_doc = (inspect.getmodule(type(task_obj.make_reward())).__doc__ or "").strip()
    task_doc = (inspect.getmodule(task_obj.prompts).__doc__ or "").strip()
    lines = [f"# `{task}` preference pairs", "",
             "Built by `preflab data build` (see `preflab/data/build.py`): for each prompt of the task split, "
             "sample k responses from the model, score each with the task's gold reward, keep the best and the "
             "worst as chosen/rejected when their score gap is at least `min_gap`. A response ends where the model "
             "stopped or at `max_new_tokens` (many are cut mid-sentence).", "",
             f"Task: {task_doc}", "", f"Gold reward: {reward_doc}", "",
             "Columns: `id`, `prompt` (one user message), `chosen`/`rejected` (one assistant message each), "
             "`score_chosen`, `score_rejected`, `domain`. `<split>.samples.jsonl` keeps every sample and score.", ""]
    for split, st in stats.items():
        cfg = st["config"]
        lines += [f"## {split}", "",
                  f"- model `{cfg['model']}`, seed {cfg['seed']}, k = {cfg['k']} samples per prompt, "
                  f"min_gap {cfg['min_gap']}, sampling {cfg['sampling']}",
                  f"- {st['prompts']} prompts, {st['samples']} samples, **{st['pairs']} pairs** "
                  f"(yield {st['yield']:.0%})", "",
                  "| score | mean | q25 | median | q75 | min | max |", "|---|---|---|---|---|---|---|"]
        for key in ("score_all_samples", "score_chosen", "score_rejected", "score_gap"):
            d = st[key]
            lines.append(f"| {key.replace('score_', '')} | " + " | ".join(
                f"{d[k]:.3f}" for k in ("mean", "q25", "median", "q75", "min", "max")) + " |")
        lines.append("")
    lines += ["Rebuild (resumes where a build stopped; deterministic for a seed):", "", "```",
              *(_rebuild_command(task, out, st["config"]) for st in stats.values()), "```", ""]
    path = out / "README.md"
    path.write_text("\n".join(lines))
    return path


def _rebuild_command(task: str, out: Path, cfg: dict) -> str:
    sampling = cfg["sampling"]
    parts = [f"preflab data build {task} --split {cfg['split']} --out {out}", f"-k {cfg['k']}",
             f"--min-gap {cfg['min_gap']}", f"--seed {cfg['seed']}", f"--model {cfg['model']}",
             f"--max-new-tokens {sampling['max_new_tokens']}", f"--temperature {sampling['temperature']}",
             f"--top-p {sampling['top_p']}", f"--batch-prompts {cfg['batch_prompts']}"]
    if cfg["num_prompts"] is not None:
        parts.insert(1, f"--num-prompts {cfg['num_prompts']}")

    return " ".join(parts)
