"""The composability matrix's engine slice: engine × parametrization × optimizer × schedule under 2 CPU processes
(DDP through torchrun; FSDP and DeepSpeed ZeRO-2/3 through the shipped accelerate configs).

Each cell of a pairwise-covering subset (every pair of values of two axes occurs in some cell; the objective is DPO)
either trains — 2 optimizer steps with a checkpoint after the first, then a run resumed from that checkpoint under
the same engine, which must end with bitwise the same weights — or is refused before any work by a row of the one
refusal table, with that row's message. A cell takes what the engine needs where the table says so: OFS's routed
forward (``ofs.fused_forward``) under FSDP and DeepSpeed, one clipping norm (``ofs.clip_scope: joint``) under
DeepSpeed. The default suite runs one cell per engine; ``-m matrix`` runs them all.
"""

from __future__ import annotations

import itertools

import pytest
import test_matrix
from test_distributed import launch
from test_matrix import (
    OPTIMIZERS,
    PARAMETRIZATIONS,
    SCHEDULES,
    _args,
    _pairwise,
    _resume_from_step_1,
    assert_same_final,
)

from preflab.config import ConfigError, load_config
from preflab.train.compat import check_compatible, refusal

world = test_matrix.world  # the matrix's fixture (the base, SFT and data files), shared
ENGINES = {"ddp": "ddp", "fsdp": "fsdp", "zero2": "deepspeed", "zero3": "deepspeed"}  # launched as → the table's name
SLICE_AXES = (ENGINES, PARAMETRIZATIONS, OPTIMIZERS, SCHEDULES)
PLACES = {"base": "base", "sft": "sft", "data": "d.jsonl", "domains": "data.domains=[{name: a, train: a.jsonl}, "
          "{name: b, train: b.jsonl}]"}  # (where the files will be: a refusal reads only the config's values)


def _engine_needs(engine: str, schedule: str) -> list[str]:
    if schedule not in ("ofs", "cofs") or engine == "ddp":  # (DDP: one forward per module, any pair)
        return []
    return ["ofs.fused_forward=true"] + (["ofs.clip_scope=joint"] if ENGINES[engine] == "deepspeed" else [])


def _cell_args(places, cell, out) -> list[str]:
    return _args(places, ("dpo", *cell[1:]), out, *_engine_needs(cell[0], cell[3]))


def _refused(cell):
    return refusal(load_config(None, _cell_args(PLACES, cell, "out")), ENGINES[cell[0]])


PRODUCT = list(itertools.product(*map(list, SLICE_AXES)))
REFUSED = [c for c in PRODUCT if _refused(c) is not None]
CELLS = _pairwise(SLICE_AXES, [c for c in PRODUCT if c not in REFUSED])  # the cells that train, pairwise
DEFAULT = {engine: next(c for c in CELLS if c[0] == engine) for engine in ENGINES}  # the default suite's share


def _check(world, cell, tmp_path) -> None:  # noqa: F811
    launch(cell[0], _cell_args(world, cell, tmp_path / "straight"), tmp_path)
    _resume_from_step_1(tmp_path / "straight", tmp_path / "resumed", cell[3])
    launch(cell[0], _cell_args(world, cell, tmp_path / "resumed"), tmp_path)
    assert_same_final(tmp_path / "straight", tmp_path / "resumed", cell)


def test_every_refused_cell_of_the_slice_is_refused_before_any_work_with_the_tables_message():
    assert len(REFUSED) < len(PRODUCT)
    for cell in REFUSED:
        config = load_config(None, _cell_args(PLACES, cell, "out"))
        with pytest.raises(ConfigError) as info:
            check_compatible(config, ENGINES[cell[0]])
        assert str(info.value) == _refused(cell).message(config, ENGINES[cell[0]])


@pytest.mark.parametrize("cell", DEFAULT.values(), ids="-".join)
def test_one_cell_per_engine_trains_and_resumes_exactly(world, tmp_path, cell):  # noqa: F811
    _check(world, cell, tmp_path)


@pytest.mark.matrix
@pytest.mark.parametrize("cell", [c for c in CELLS if c not in DEFAULT.values()], ids="-".join)
def test_every_cell_of_the_engine_slice_trains_and_resumes_exactly_or_is_refused(world, tmp_path, cell):  # noqa: F811
    _check(world, cell, tmp_path)
