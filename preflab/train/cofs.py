"""Continual alignment over ordered domains (``schedule: cofs``): COFS-DPO and its baselines.

``data.domains`` lists the domains in order; ``cofs.arm`` picks what runs over them (spec ../methods/ofs-cofs.md §2):

- ``cofs``: per domain d, OFS-DPO (``preflab.train.ofs``) whose export is the domain's module φ*_d (``cofs.select``;
  default the fast module at its lowest held-out loss). With ``cofs.init: from_combined`` it trains on top of the
  previous combination folded into the weights, so its full delta is D_d = C_{d−1} + ΔW(φ*_d); with ``fresh`` on
  θ₀, D_d = ΔW(φ*_d). The weights w on the simplex that minimise the objective (or maximise preference accuracy) on
  the union of the domains' replay buffers, policy θ₀ + Σ w_j D_j and reference θ₀, give C_d. Every D_j and C_d
  is a coefficient vector over the stored LoRA products ("atoms"), combined exactly
  (:mod:`preflab.ofs.combine`), never factor by factor.
- ``sequential_ofs`` / ``sequential_dpo``: each domain trains on the previous domain's model (the reference is the
  model it starts from, as for COFS's ``from_combined``) — no combination.
- ``joint_dpo``: one DPO run on all domains' pairs together (the upper bound), ``train.max_steps`` × D steps.

Layout of ``output_dir``: ``stage-<d>-<name>/`` with ``buffer.jsonl`` (the replay rows), ``train/`` (the inner run,
resumable by checkpoint), ``combine.json`` and ``combined/`` (COFS: the candidates tried, the chosen weights, the
combination as one PEFT adapter on θ₀), ``model/`` (the stage's model, dense), ``eval.json`` (every domain's held-out
preference metrics and gold reward, against θ₀) and ``done.json`` last; a rerun skips finished stages. At the end,
``matrix.json`` (the forgetting matrix, average final score, average forgetting), one ``cofs/`` record per stage in
``metrics.jsonl``, and ``final/`` (the last model, plain ``transformers``).

Under several processes (DDP, FSDP, DeepSpeed) the stages train under that engine (OFS with
``ofs.fused_forward: true`` under FSDP and DeepSpeed); the driver's own work — buffers, weight search, folding,
evaluations — runs on plain models, deterministic, on every process alike (no coordination needed to agree), the
main process alone writes (a stage's weights from the run's whole copy, ``final_policy``), and the processes meet at
a barrier before anything written is read.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import random
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState

from ..config import Config, ConfigError, DomainConfig
from ..data.dataset import load_pairs
from ..data.sources import read_rows
from ..data.tokenize import PairTokenizer
from ..eval.generation import GenerationEvaluator
from ..eval.preference import SequenceLogps, preference_metrics, score_pairs
from ..losses import build_objective
from ..models.loader import load_model, load_tokenizer
from ..models.scorer import SequenceScorer, eval_mode
from ..ofs.dense import dense_delta, save_delta
from .cofs_combine import Combination
from .compat import check_compatible
from .engine import cpu_processes
from .loop import TrainingRun
from .model_card import write_final_card
from .outputs import RunResult, copy_dir_atomically, record_config, save_model_atomically, write_json, write_rows
from .schedules import pin_for_inner_runs, register_schedule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CofsSettings:
    """Continual alignment over ``data.domains`` (``schedule: cofs``, preflab.train.cofs). ``arm`` picks COFS-DPO or
    one of its baselines, so that a comparison is one config change. The spec is ../methods/ofs-cofs.md §2."""

    # cofs: OFS per domain, the domains' best fast modules combined; sequential_ofs / sequential_dpo: each domain
    # continues from the previous one's model; joint_dpo: DPO on all domains at once (upper bound)
    arm: str = field(default="cofs", metadata={"choices": ("cofs", "sequential_ofs", "sequential_dpo", "joint_dpo")})
    select: str = field(default="best_val_fast", metadata={"choices": ("best_val_fast", "final_leader", "final_fast")})
    buffer_size: int = 128  # replay pairs kept per domain (uniform sample, seeded)
    replay_in_training: bool = False  # true: a domain also trains on the earlier domains' buffers
    init: str = field(default="from_combined", metadata={"choices": ("from_combined", "fresh")})
    select_metric: str = field(default="dpo_loss", metadata={"choices": ("dpo_loss", "pref_acc")})
    grid_max_domains: int = 3  # up to this many modules: simplex grid; more: projected gradient descent
    grid_step: float = 0.1
    pgd_steps: int = 50
    pgd_lr: float = 0.05
    pgd_optimizer: str = field(default="adam", metadata={"choices": ("adam", "sgd")})  # sgd: plain projected GD
    # how the stored modules combine exactly: factors (LoRA: concatenated factors, exported as one adapter), dense
    # (any parametrization: θ₀ + Σ w ΔW on the dense weight changes), auto: factors for LoRA, else dense
    combine: str = field(default="auto", metadata={"choices": ("auto", "factors", "dense")})

    def __post_init__(self) -> None:
        for name in ("buffer_size", "grid_max_domains", "pgd_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.pgd_lr <= 0:
            raise ValueError(f"pgd_lr: must be > 0, got {self.pgd_lr}")
        n = round(1 / self.grid_step) if self.grid_step > 0 else 0
        if n < 1 or abs(n * self.grid_step - 1) > 1e-9:
            raise ValueError(f"grid_step: must divide 1 (0.1, 0.25, 0.5, ...), got {self.grid_step}")

SELECT_EXPORT = {"best_val_fast": "best_val_fast", "final_leader": "leader", "final_fast": "fast"}


def _rows(source: str, split: str) -> list[dict]:
    return [r.data for r in read_rows(source, split) if r.data is not None]


def _interleave(groups: list[list[dict]]) -> list[dict]:
    """Round-robin over the groups, so that the first N rows hold every group (data.max_*_pairs)."""
    out = []
    for i in range(max(map(len, groups))):
        out.extend(g[i] for g in groups if i < len(g))
    return out


def forgetting_summary(names: list[str], scores: list[dict[str, float]]) -> dict:
    """``scores[k][name]``: the held-out score of each domain after stage k. Average final score over all domains;
    average forgetting over the domains before the last: the best score a domain had after its own stage minus its
    final score."""
    final = scores[-1]
    out = {"average_final": sum(final[n] for n in names) / len(names)}
    if len(scores) == len(names) and len(names) > 1:
        drops = [max(scores[k][n] for k in range(j, len(names) - 1)) - final[n] for j, n in enumerate(names[:-1])]
        out["average_forgetting"] = sum(drops) / len(drops)
        out["forgetting"] = dict(zip(names[:-1], drops))
    return out


class DomainsRun:
    """One ``schedule: cofs`` run; :meth:`run` does (or finishes) every stage."""

    def __init__(self, config: Config):
        self.config, self.cc = config, config.cofs
        self.run_dir = Path(config.output_dir)
        self.domains: tuple[DomainConfig, ...] = config.data.domains
        if not self.domains:
            raise ConfigError("data.domains: schedule: cofs needs the ordered domains, e.g. "
                              "data.domains=[sentiment, format, concision]")
        missing = [d.name for d in self.domains if d.eval is None]
        if missing:
            raise ConfigError(f"data.domains: every domain needs held-out pairs (eval) to be scored; {missing} have "
                              "none")
        check_compatible(config)
        self.processes = PartialState(cpu=cpu_processes())  # the process group (one process: a no-op)
        self.main = self.processes.is_main_process
        self.device = self.processes.device
        self.tokenizer = load_tokenizer(config.model.name)
        dc = config.data
        self.pair_tokenizer = PairTokenizer(self.tokenizer, dc.max_length, dc.max_prompt_length, dc.prompt_truncation)
        self.objective = build_objective([t.to_dict() for t in config.loss])
        self._base = None
        self._eval_pairs: dict[str, list] = {}
        self._eval_reference: dict[str, SequenceLogps] = {}
        self._evaluators: dict[str, GenerationEvaluator] = {}
        self.combination = Combination(self)

    # -- pieces -------------------------------------------------------------------------------------------

    def base(self) -> torch.nn.Module:
        """θ₀, the reference of every score."""
        if self._base is None:
            mc = self.config.model
            self._base = load_model(mc.name, mc.dtype, mc.attn_implementation).to(self.device).eval()
            self._base.requires_grad_(False)
        return self._base

    def stages(self) -> list[DomainConfig]:
        if self.cc.arm != "joint_dpo":
            return list(self.domains)
        return [DomainConfig("joint", "", "")]

    def stage_dir(self, d: int) -> Path:
        return self.run_dir / f"stage-{d + 1}-{self.stages()[d].name}"

    def start_model(self, d: int) -> str:
        if d == 0 or (self.cc.arm == "cofs" and self.cc.init == "fresh"):
            return self.config.model.name
        return str(self.stage_dir(d - 1) / "model")

    def score(self, model: torch.nn.Module, pairs: list) -> SequenceLogps:
        sc = self.config.scorer
        with eval_mode(model):
            return score_pairs(SequenceScorer(model, sc.chunk_size), pairs, self.config.train.eval_batch_size,
                               self.tokenizer.pad_token_id, self.device, sc.layout, sc.pack_tokens)

    def load(self, source: str, split: str, limit: int | None = None) -> list:
        return load_pairs(source, split, self.pair_tokenizer, self.config.data.on_error, limit)[0]

    def write_buffer(self, d: int) -> Path:
        """The domain's replay buffer: a seeded uniform sample of ``cofs.buffer_size`` training rows."""
        path = self.stage_dir(d) / "buffer.jsonl"
        if self.main and not path.is_file():
            domain = self.domains[d]
            rows = _rows(domain.train, domain.train_split)
            rng = random.Random(f"cofs-buffer-{self.config.seed}-{d}")
            keep = sorted(rng.sample(range(len(rows)), min(self.cc.buffer_size, len(rows))))
            write_rows([rows[i] for i in keep], path)
        self.processes.wait_for_everyone()
        return path

    def write_rows(self, rows: list[dict], path: Path) -> None:
        if self.main:
            write_rows(rows, path)
        self.processes.wait_for_everyone()

    def inner_config(self, d: int) -> Config:
        c, out, arm = pin_for_inner_runs(self.config), self.stage_dir(d), self.cc.arm
        dc, tc, ofs = c.data, c.train, c.ofs
        if arm == "joint_dpo":
            train = out / "train.jsonl"
            self.write_rows(_interleave([_rows(x.train, x.train_split) for x in self.domains]), train)
            held_out = out / "eval.jsonl"
            self.write_rows(_interleave([_rows(x.eval, x.eval_split) for x in self.domains]), held_out)
            data = dataclasses.replace(dc, train=str(train), eval=str(held_out), domains=())
            tc = dataclasses.replace(tc, max_steps=tc.max_steps and tc.max_steps * len(self.domains))
        else:
            domain = self.domains[d]
            data = dataclasses.replace(dc, train=domain.train, train_split=domain.train_split, eval=domain.eval,
                                       eval_split=domain.eval_split, domains=())
            if self.cc.replay_in_training and d > 0:
                train = out / "train.jsonl"
                groups = [_rows(domain.train, domain.train_split)]
                groups += [_rows(str(self.stage_dir(j) / "buffer.jsonl"), "train") for j in range(d)]
                self.write_rows([r for g in groups for r in g], train)
                data = dataclasses.replace(data, train=str(train))
        if arm == "cofs":
            ofs = dataclasses.replace(ofs, export=SELECT_EXPORT[self.cc.select])
        schedule = "ofs" if arm in ("cofs", "sequential_ofs") else "offline"
        return dataclasses.replace(
            c.with_section("ofs", ofs).with_schedule(schedule), resume="auto", output_dir=str(out / "train"),
            data=data, train=tc, model=dataclasses.replace(c.model, name=self.start_model(d)),
            eval=dataclasses.replace(c.eval, task=None))  # the driver scores every domain against θ₀

    # -- scoring ------------------------------------------------------------------------------------------

    def evaluate_domains(self, model: torch.nn.Module) -> dict:
        """Every domain's held-out preference metrics and (with a task) gold reward, against θ₀."""
        out = {}
        for domain in self.domains:
            if domain.name not in self._eval_pairs:
                pairs = self.load(domain.eval, domain.eval_split, self.config.data.max_eval_pairs)
                self._eval_pairs[domain.name] = pairs
                self._eval_reference[domain.name] = self.score(self.base(), pairs)
            pairs = self._eval_pairs[domain.name]
            result = {"preference": preference_metrics(self.objective, self.score(model, pairs),
                                                       self._eval_reference[domain.name])}
            if domain.task:
                if domain.name not in self._evaluators:
                    cfg = dataclasses.replace(self.config.eval, task=domain.task)
                    self._evaluators[domain.name] = GenerationEvaluator(self.tokenizer, cfg)
                with eval_mode(model):
                    result["generation"] = self._evaluators[domain.name].evaluate(
                        model, lambda: nullcontext(self.base()))
                result["score"] = result["generation"]["gold/reward"]
            else:
                result["score"] = result["preference"]["rewards/accuracies"]
            out[domain.name] = result
            log.info("  %-12s score %.4f  held-out loss %.4f  acc %.3f", domain.name, result["score"],
                     result["preference"]["loss"], result["preference"]["rewards/accuracies"])
        return out

    # -- stages -------------------------------------------------------------------------------------------

    def stage(self, d: int, previous: list[dict]) -> dict:
        out, arm = self.stage_dir(d), self.cc.arm
        if self.main:
            out.mkdir(parents=True, exist_ok=True)
        self.processes.wait_for_everyone()
        log.info("cofs (%s) stage %d/%d: %s from %s", arm, d + 1, len(self.stages()), self.stages()[d].name,
                 self.start_model(d))
        if arm != "joint_dpo":
            self.write_buffer(d)
        run = TrainingRun(self.inner_config(d))
        result: RunResult = run.run()
        record = {"stage": d + 1, "domain": self.stages()[d].name, "steps": result.steps, "seconds": result.seconds,
                  "start": self.start_model(d)}
        if arm == "cofs":
            if self.combination.dense and self.main:  # the domain's module as its dense change of the weights
                mc = self.config.model
                save_delta(dense_delta(run.final_policy.merged_model(),
                                       load_model(self.start_model(d), mc.dtype, mc.attn_implementation)),
                           out / "module")
            del run
            gc.collect()
            self.processes.wait_for_everyone()
            model, record["cofs"] = self.combination.combine(d, previous)
        else:  # (whole weights on the main process only where the engine shards them: the others read its copy)
            model = run.final_policy.merged_model() if run.final_policy is not None else None
            del run
            gc.collect()
        if self.main:
            save_model_atomically(model, self.tokenizer, out / "model")
        self.processes.wait_for_everyone()
        if model is None:
            mc = self.config.model
            model = load_model(str(out / "model"), mc.dtype, mc.attn_implementation)
        model = model.to(self.device)
        record["eval"] = self.evaluate_domains(model)
        record["scores"] = {k: v["score"] for k, v in record["eval"].items()}
        del model
        gc.collect()
        if self.main:
            write_json(out / "eval.json", record["eval"])
            write_json(out / "done.json", {k: v for k, v in record.items() if k != "eval"})
        self.processes.wait_for_everyone()
        return record

    def run(self) -> RunResult:
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            record_config(self.config, self.run_dir, None)
        self.processes.wait_for_everyone()
        records: list[dict] = []
        for d in range(len(self.stages())):
            done = self.stage_dir(d) / "done.json"
            if done.is_file():
                records.append(json.loads(done.read_text()))
                log.info("cofs stage %d (%s) already done", d + 1, records[-1]["domain"])
                continue
            records.append(self.stage(d, records))
        names = [x.name for x in self.domains]
        scores = [r["scores"] for r in records]
        summary = {"arm": self.cc.arm, "domains": names, "stages": [r["domain"] for r in records],
                   "scores": scores, **forgetting_summary(names, scores)}
        lines, steps = [], 0
        for r in records:
            steps += r["steps"]
            line = {"step": steps, "cofs/stage": r["stage"], "cofs/domain": r["domain"],
                    **{f"cofs/score/{k}": v for k, v in r["scores"].items()}}
            if "cofs" in r:
                line.update({"cofs/weights": r["cofs"]["weights"], "cofs/objective": r["cofs"]["objective"]})
            lines.append(json.dumps(line) + "\n")
        if self.main:
            write_json(self.run_dir / "matrix.json", summary)
            (self.run_dir / "metrics.jsonl").write_text("".join(lines))
            copy_dir_atomically(self.stage_dir(len(records) - 1) / "model", self.run_dir / "final")
            write_final_card(self.run_dir / "final", self.config, {}, steps, (
                f"- continual alignment, `cofs.arm={self.cc.arm}`: one stage per domain ({', '.join(names)}); "
                "`final/` is the model after the last stage, every adapter merged into the weights",
                "- score after each stage (gold reward, or implicit accuracy without a task):", "",
                "```", format_matrix(summary), "```"))
        self.processes.wait_for_everyone()
        return RunResult(self.run_dir, steps, sum(r["seconds"] for r in records), None, None, None,
                         f"cofs.arm={self.cc.arm}, score after each stage (gold reward, or implicit accuracy "
                         f"without a task):\n{format_matrix(summary)}")


def format_matrix(summary: dict) -> str:
    names = summary["domains"]
    lines = ["after stage    " + "  ".join(f"{n:>12}" for n in names)]
    for stage, row in zip(summary["stages"], summary["scores"]):
        lines.append(f"{stage:<14} " + "  ".join(f"{row[n]:>12.4f}" for n in names))
    lines.append(f"average final score {summary['average_final']:.4f}")
    if "average_forgetting" in summary:
        lines.append(f"average forgetting {summary['average_forgetting']:.4f}")
    return "\n".join(lines)


register_schedule("cofs", CofsSettings, driver=DomainsRun, uses=lambda sections: ("ofs",))
