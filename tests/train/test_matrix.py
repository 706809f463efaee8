"""The composability matrix: objective family × parametrization × optimizer × schedule on a tiny model.

Every cell either trains — 2 optimizer steps with a checkpoint after the first, then a second run resumed from that
checkpoint, which must end with bitwise the same weights as the uninterrupted one — or is refused before any work
by a row of the one refusal table (:mod:`preflab.train.compat`), with that row's message. The default suite runs
a pairwise-covering subset of the cells (every pair of values of two axes occurs in some cell);
``python -m pytest -m matrix tests/train/test_matrix.py`` runs every cell of the product.
"""

from __future__ import annotations

import itertools
import shutil

import pytest
import torch
from conftest import make_tiny_model, sentiment_rows, write_jsonl
from safetensors.torch import load_file

from preflab.config import ConfigError, load_config
from preflab.train import train
from preflab.train.checkpoint import list_checkpoints
from preflab.train.compat import refusal

OBJECTIVES = {"dpo": ["loss.name=sigmoid"], "ipo": ["loss.name=ipo"],
              "flex": ["loss={name: flex, beta_chosen: 0.2, beta_rejected: 0.1, logp_normalize: mean}"],
              "dpo+sft": ["loss=[{name: sigmoid}, {name: sft, weight: 0.1}]"], "sft": ["loss.name=sft"]}
PARAMETRIZATIONS = {"lora": ["parametrization={kind: lora, r: 4}"], "dora": ["parametrization={kind: dora, r: 4}"],
                    "ropo": ["parametrization={kind: ropo, target_modules: [all-linear], factors: [[2, 1]]}"],
                    "full": ["parametrization={kind: full}", "train.lr=1e-3"]}
OPTIMIZERS = {"adamw": [], "ondare": ["optim={name: ondare_adamw, base_model: BASE, reserve_p: 0.5, alpha: 0.01}"],
              "onties": ["optim={name: onties_adamw, base_model: BASE, reserve_p: 0.5, alpha: 0.01}"]}
SCHEDULES = {"offline": [], "ofs": ["schedule=ofs", "ofs.swap_interval=1", "ofs.alpha=0.5"],
             "apo": ["schedule=apo", "apo.task=concision", "apo.iterations=2", "apo.prompts_per_iteration=4",
                     "apo.k=2", "apo.max_new_tokens=6", "apo.batch_prompts=4", "apo.min_score_gap=-1",
                     "train.max_steps=1"],
             "cofs": ["schedule=cofs", "DOMAINS", "cofs.buffer_size=4", "cofs.grid_step=0.5", "train.max_steps=1"]}
AXES = (OBJECTIVES, PARAMETRIZATIONS, OPTIMIZERS, SCHEDULES)


def _pairwise(axes, candidates=None) -> list[tuple[str, ...]]:
    """Cells (of ``candidates``, default: every cell of the product) covering every pair of values of two axes that
    some candidate holds (greedy, deterministic)."""
    candidates = list(candidates or itertools.product(*map(list, axes)))
    pairs = list(itertools.combinations(range(len(axes)), 2))
    uncovered = {(i, cell[i], j, cell[j]) for cell in candidates for i, j in pairs}
    cells = []

    def gain(cell, left):
        return sum((i, cell[i], j, cell[j]) in left for i, j in pairs)

    while uncovered:
        best = max(candidates, key=lambda cell: gain(cell, uncovered))
        cells.append(best)
        uncovered -= {(i, best[i], j, best[j]) for i, j in pairs}
    return cells


PAIRWISE = _pairwise(AXES)
ALL = [c for c in itertools.product(*map(list, AXES)) if c not in PAIRWISE]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer):
    """A base model, an "SFT" model of it (the policy's start: the task vector's θ_SFT), pairs and two domains."""
    root = tmp_path_factory.mktemp("matrix")
    base, sft = root / "base", root / "sft"
    make_tiny_model(tokenizer, seed=5).save_pretrained(base)
    moved = make_tiny_model(tokenizer, seed=5)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.01 * torch.randn_like(p))
    moved.save_pretrained(sft)
    for path in (base, sft):
        tokenizer.save_pretrained(path)
    a = write_jsonl(root / "a.jsonl", sentiment_rows(6))
    b = write_jsonl(root / "b.jsonl", [{**r, "chosen": r["rejected"], "rejected": r["chosen"]}
                                       for r in sentiment_rows(6, 100)])
    domains = f"data.domains=[{{name: a, train: {a}, eval: {a}}}, {{name: b, train: {b}, eval: {b}}}]"
    return {"base": str(base), "sft": str(sft), "data": a, "domains": domains}


def _args(world, cell, out, *extra) -> list[str]:
    args = [f"model.name={world['sft']}", f"data.train={world['data']}", "data.eval=null", f"output_dir={out}",
            "train.progress=false", "train.warmup_ratio=0", "diag.enabled=false", "train.batch_size=3",
            "train.lr=1e-2", "train.max_steps=2", "train.save_steps=1", "train.save_total_limit=null"]
    for axis, name in zip(AXES, cell):
        args += [a.replace("BASE", world["base"]) if a != "DOMAINS" else world["domains"] for a in axis[name]]
    return args + list(extra)


def _config(world, cell, out, *extra):
    return load_config(None, _args(world, cell, out, *extra))


def _final_weights(run_dir) -> dict:
    final = run_dir / "final"
    files = sorted(final.glob("*.safetensors"))
    assert files, f"nothing exported in {final}"
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(f).items()}


def _check_cell(world, cell, tmp_path):
    config = _config(world, cell, tmp_path / "straight")
    refused = refusal(config, "single")
    if refused is not None:
        with pytest.raises(ConfigError) as info:
            train(config)
        assert str(info.value) == refused.message(config, "single")
        return
    train(config)
    _resume_from_step_1(tmp_path / "straight", tmp_path / "resumed", cell[3])
    train(_config(world, cell, tmp_path / "resumed"))
    assert_same_final(tmp_path / "straight", tmp_path / "resumed", cell)


def _resume_from_step_1(straight, resumed, schedule: str) -> None:
    """``resumed``: the run directory ``straight`` as it stood at its checkpoint of step 1."""
    if schedule in ("offline", "ofs"):  # resumed from the checkpoint of step 1
        checkpoint = list_checkpoints(straight)[0]
        shutil.copytree(straight, resumed, ignore=shutil.ignore_patterns("final", "checkpoints"))
        (resumed / "checkpoints").mkdir()
        shutil.copytree(checkpoint, resumed / "checkpoints" / checkpoint.name)
    else:  # an outer schedule: its first inner run resumes from the checkpoint of step 1 (sampling and buffers are
        # seeded: redone alike), the rest runs afresh
        first = sorted(straight.glob("*-1*/train"))[0]
        checkpoint = list_checkpoints(first)[0]
        inner = resumed / first.relative_to(straight)
        shutil.copytree(checkpoint, inner / "checkpoints" / checkpoint.name)


def assert_same_final(straight, resumed, cell) -> None:
    a, b = _final_weights(straight), _final_weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), cell


@pytest.mark.parametrize("cell", PAIRWISE, ids="-".join)
def test_pairwise_cells_train_and_resume_exactly_or_are_refused_by_the_table(world, tmp_path, cell):
    _check_cell(world, cell, tmp_path)


@pytest.mark.matrix
@pytest.mark.parametrize("cell", ALL, ids="-".join)
def test_every_other_cell_trains_and_resumes_exactly_or_is_refused_by_the_table(world, tmp_path, cell):
    _check_cell(world, cell, tmp_path)
