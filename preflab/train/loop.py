"""The training loop of every offline-like schedule, on ``accelerate``: it knows no schedule and no engine.

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` pairs per process: collate, reference log-probs
(:mod:`preflab.train.reference`), the schedule's step (:class:`~preflab.train.program.StepProgram`: forwards and
loss), the non-finite check, backward; then clipping, the update and the scheduler. Every backward, clip, update,
reduction and checkpoint goes through the engine (:mod:`preflab.train.engine`); held-out evaluation, the 3D probe
and the energy through :mod:`preflab.train.evaluation`. Checkpoints make a run resumable exactly (``resume: auto``).
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from transformers import get_scheduler

from ..adapters import Parametrization
from ..config import Config, ConfigError
from ..console import progress
from ..data.collate import PreferenceBatch, collate_pairs
from ..data.dataset import load_pairs
from ..data.tokenize import PairTokenizer
from ..losses import Objective, build_objective
from ..models.loader import load_model, load_tokenizer
from ..models.scorer import SequenceScorer
from ..optim import OptimizerInputs, build_optimizer
from .checkpoint import (
    begin_checkpoint,
    checkpoint_step,
    commit_checkpoint,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from .compat import check_compatible, continued_adapter
from .engine import make_engine
from .evaluation import Evaluation
from .metrics import MetricAccumulator, MetricsWriter
from .model_card import write_final_card
from .order import BatchOrder
from .outputs import RunResult, TrainingError, flat, record_config, resume_path, write_json
from .reference import ReferenceLogps
from .safety import StopRequest, TrainingInterrupted, check_disk_space, check_writable, checkpoint_bytes
from .schedules import schedule_registry

log = logging.getLogger(__name__)


class TrainingRun:
    """One run of an offline-like schedule (``config.schedule``); :meth:`run` trains it to the end or resumes it."""

    def __init__(self, config: Config):
        spec = schedule_registry()[config.schedule]
        if spec.program is None:
            raise ConfigError(f"schedule: {config.schedule} drives runs of its own; train it with preflab.train.train")
        self.config = config
        self.run_dir = Path(config.output_dir)
        self.resume_from = resume_path(config, self.run_dir)  # config errors before any work
        tc = config.train
        check_compatible(config)  # before any work (and before any process group)
        check_writable(self.run_dir)
        # accelerate keeps one AcceleratorState per process; several runs in a process (tests, schedules that chain
        # runs) may differ in precision. The process-group state (PartialState) is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
        self.engine = make_engine(mixed_precision="bf16" if tc.precision == "bf16" else "no",
                                  log_with=list(tc.report_to) or None, project_dir=str(self.run_dir))
        self.program = spec.program(config)
        self.world, self.rank = self.engine.world, self.engine.rank
        log.info("engine %s: %d process%s", self.engine.banner, self.world, "es" if self.world > 1 else "")
        self.engine.configure(tc.batch_size, tc.grad_accum, tc.max_grad_norm)
        set_seed(config.seed)
        self.tokenizer = load_tokenizer(config.model.name)
        dc = config.data
        pair_tokenizer = PairTokenizer(self.tokenizer, dc.max_length, dc.max_prompt_length, dc.prompt_truncation)
        self.train_pairs, report = load_pairs(dc.train, dc.train_split, pair_tokenizer, dc.on_error, dc.max_train_pairs)
        self.reports = [report.summary()]
        self.eval_pairs = []
        if dc.eval:
            self.eval_pairs, report = load_pairs(dc.eval, dc.eval_split, pair_tokenizer, dc.on_error, dc.max_eval_pairs)
            self.reports.append(report.summary())
        model = load_model(config.model.name, config.model.dtype, config.model.attn_implementation)
        if tc.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.param = self.program.parametrization(model)
        self.objective: Objective = build_objective([t.to_dict() for t in config.loss])
        sc = config.scorer
        self.reference = ReferenceLogps(self.param, self.engine, self.train_pairs, sc.chunk_size, self.collate,
                                        "none" if self.objective.reference_free else sc.reference_cache,
                                        sc.reference_cache_dir, tc.precision)
        # a global batch of batch_size pairs per process; process r takes every world-th pair of it
        self.order = BatchOrder(len(self.train_pairs), tc.batch_size * self.world, config.seed)
        self.total_steps = tc.max_steps or math.ceil(tc.epochs * self.order.batches_per_epoch / tc.grad_accum)
        self.optimizer = self._optimizer()
        self.scheduler = get_scheduler(tc.lr_scheduler, self.optimizer,
                                       num_warmup_steps=round(tc.warmup_ratio * self.total_steps),
                                       num_training_steps=self.total_steps)
        self.scorer, self.optimizer = self.engine.prepare(SequenceScorer(self.param.model, sc.chunk_size),
                                                          self.optimizer)
        self.param.place(self.engine.device)
        self.pad_id = self.tokenizer.pad_token_id
        # the objective's running means (BCO's δ) live in the checkpointed state
        self.state = {"step": 0, "micro": 0, "tokens": 0, "seconds": 0.0, "objective": self.objective.state}
        self.eval_record: dict = {"before": None, "history": [], "after": None}
        # after run(): the trained policy with whole weights (whole_policy), for a driver's work on the main process
        self.final_policy: Parametrization | None = None
        self.evaluation = Evaluation(config, self.engine, self.objective, self.reference, self.train_pairs,
                                     self.eval_pairs, self.pad_id)
        self.program.prepare(self)

    def _optimizer(self) -> torch.optim.Optimizer:
        oc, tc = self.config.optim, self.config.train
        inputs = OptimizerInputs(self.program.param_groups(self.param), tc.lr, tc.adam_betas,
                                 self.param.trainable_parameters(), self.config.model.name,
                                 continued_adapter(self.config))
        try:
            return build_optimizer(oc.name, oc.params, inputs)
        except ValueError as e:
            raise ConfigError(f"optim: {e}") from None

    # -- pieces of a step ---------------------------------------------------------------------------------

    def collate(self, indices: list[int]) -> PreferenceBatch:
        sc = self.config.scorer
        pairs = [self.train_pairs[i] for i in indices]
        return collate_pairs(pairs, self.pad_id, sc.layout, sc.pack_tokens).to(self.engine.device)

    def reference_logps(self, indices: list[int], batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The reference's ``(logps, shared)`` of the batch's chosen then rejected, each ``(2B,)`` (None for a
        reference-free objective)."""
        return None if self.objective.reference_free else self.reference.logps(indices, batch)

    def _nonfinite(self, what: str, indices: list[int]) -> None:
        """Stops (``train.on_nonfinite: stop``) or counts a skipped update; either way the message says where."""
        rows = ", ".join(self.train_pairs[i].where for i in indices[:4])
        where = f"at step {self.state['step'] + 1}, batch of {len(indices)} pairs starting with: {rows}"
        tc = self.config.train
        if tc.on_nonfinite == "stop":
            raise TrainingError(f"{what} {where}; no checkpoint was written for this step "
                                "(train.on_nonfinite=skip skips such updates)")
        self.state["nonfinite_skips"] = self.state.get("nonfinite_skips", 0) + 1
        log.warning("%s %s: update skipped (%d so far)", what, where, self.state["nonfinite_skips"])
        if self.state["nonfinite_skips"] > tc.max_nonfinite_skips:
            kept = list_checkpoints(self.run_dir)
            kept = f"the last checkpoint, {kept[-1].name}, holds finite weights" if kept else \
                "no checkpoint was written yet"
            raise TrainingError(f"{what} {where}: more than train.max_nonfinite_skips={tc.max_nonfinite_skips} "
                                f"updates skipped; stopping ({kept})")

    def micro_step(self, indices: list[int], global_size: int, sync: bool, scale: float) -> dict | None:
        """Forward and backward of this process's share of a micro-batch of ``global_size`` pairs; None when the
        loss was not finite (on any process) and skipping is on."""
        batch = self.collate(indices)
        ref = self.reference_logps(indices, batch)
        forwards = self.program.forwards
        with self.engine.no_sync(sync, forwards), self.engine.autocast():
            step = self.program.forward(self, batch, ref)
            # the mean over the global micro-batch once DDP averages the gradients of the processes
            loss = step.loss_sum / global_size * self.world
            if self.engine.anywhere(not torch.isfinite(loss).item()):
                self._nonfinite(f"non-finite loss ({step.shown()})", indices)
                return None
            with self.program.recomputation(self, batch):
                self.engine.backward(loss * scale, sync, forwards)
        self.state["tokens"] += batch.num_tokens
        return step.metrics

    def optimizer_step(self) -> dict:
        tc = self.config.train
        acc = MetricAccumulator()
        tokens_before, t0 = self.state["tokens"], time.perf_counter()
        seen: list[int] = []
        skip = False
        first = self.state["micro"]
        self.state["micro"] += tc.grad_accum
        micro = [self.order.batch(first + i) for i in range(tc.grad_accum)]
        # an epoch's last batch too small to give every process a pair is passed over; the gradients are synced
        # (DDP) and the update taken (DeepSpeed) at the last micro-batch that runs
        runs = [i for i, full in enumerate(micro) if len(full) >= self.world]
        for i, full in enumerate(micro):
            if skip:  # the rest of a skipped update's micro-batches are passed over too
                continue
            if i not in runs:
                log.warning("micro-batch %d: %d pairs for %d processes, passed over", first + i, len(full),
                            self.world)
                continue
            indices = full[self.rank::self.world]
            seen += indices
            metrics = self.micro_step(indices, len(full), sync=i == runs[-1], scale=1.0 / tc.grad_accum)
            skip = metrics is None
            if metrics is not None:
                acc.add(metrics)
        record = self.engine.reduce(acc.mean(), weight=len(seen))
        if not skip:
            norm = self.program.clip(self, tc.max_grad_norm or math.inf, record)
            if math.isfinite(norm):
                record["grad_norm"] = norm
            else:
                self._nonfinite(f"non-finite gradient (norm {norm})", seen)
                skip = True
        record["lr"] = self.scheduler.get_last_lr()[0]
        if self.state.get("nonfinite_skips"):  # the running count, in every record from the first skip on
            record["nonfinite_skips"] = self.state["nonfinite_skips"]
        if skip:
            record["nonfinite_skipped"] = 1
        else:
            self.engine.step(self.optimizer)
        with warnings.catch_warnings():  # torch warns when the very first update was the skipped one
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            self.scheduler.step()  # a skipped update still counts as a step: the schedule keeps its length
        self.optimizer.zero_grad(set_to_none=True)
        self.state["step"] += 1
        seconds = time.perf_counter() - t0
        self.state["seconds"] += seconds
        record["step_seconds"] = seconds
        tokens = self.engine.reduce({"t": self.state["tokens"] - tokens_before}, how="sum")["t"]  # all processes
        record["tokens_per_second"] = tokens / seconds
        record["epoch"] = self.state["micro"] / self.order.batches_per_epoch
        record = {"step": self.state["step"], **record}
        self.program.after_update(self, record)
        return record

    # -- evaluation and checkpoints -----------------------------------------------------------------------

    def evaluate(self, policy_is_reference: bool = False) -> dict | None:
        result = self.evaluation.held_out(self.scorer, policy_is_reference)
        return self.program.evaluate(self, result, policy_is_reference)

    def save(self) -> Path | None:
        path, engine = None, self.engine
        self.reference.save()
        main = engine.is_main
        trainable = engine.trainable_state(self.param, keep=main)
        bad = [n for n, t in trainable.items() if not torch.isfinite(t).all()]
        if engine.anywhere(bool(bad)):  # never a checkpoint a resume would have to throw away
            raise TrainingError(f"refusing to write the checkpoint of step {self.state['step']}: non-finite values in "
                                f"{bad[:3]}{' and more' if len(bad) > 3 else ''}; the previous checkpoint is intact")
        optimizer = engine.optimizer_state(self.optimizer, keep=main)
        rng = engine.rng_state(rng_state())
        tmp = begin_checkpoint(self.run_dir, self.state["step"]) if main else None
        if main:
            self.program.save_files(self, tmp)
        engine.write_own_files(tmp)
        if main:
            path = commit_checkpoint(tmp, self.run_dir, self.state["step"], trainable, optimizer,
                                     self.scheduler.state_dict(), dict(self.state), self.config.train.save_total_limit,
                                     rng)
            write_json(self.run_dir / "eval.json", self.eval_record)
        engine.barrier()
        return path

    def whole_policy(self) -> Parametrization | None:
        """The trained policy with whole weights, for generation and ``final/`` (see :meth:`Engine.whole_policy`)."""

        def rebuild(state: dict) -> Parametrization:
            mc = self.config.model
            policy = self.program.parametrization(load_model(mc.name, mc.dtype, mc.attn_implementation))
            policy.load_trainable_state_dict(state)
            policy.follow(self.param)  # (a pair rests on the module the sharded one rests on)
            policy.place(self.engine.device)
            return policy

        return self.engine.whole_policy(self.param, rebuild)

    def restore(self, path: Path) -> None:
        ckpt = load_checkpoint(path)
        self.engine.check_resumable(path)
        self.engine.restore(ckpt, path, self.param, self.optimizer)
        self.scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(self.engine.own_rng(ckpt["rng"]))
        self.state = ckpt["state"]
        self.objective.load_state(self.state.get("objective", {}))  # (a checkpoint older than the running means)
        self.state["objective"] = self.objective.state
        if self.engine.is_main:
            self.program.restore_files(self, path)
        self.engine.barrier()
        eval_path = self.run_dir / "eval.json"
        if eval_path.is_file():
            self.eval_record = json.loads(eval_path.read_text())
            self.eval_record["history"] = [h for h in self.eval_record["history"] if h["step"] <= self.state["step"]]
            self.eval_record["after"] = None
            self.eval_record.pop("generation", None)
        self.program.after_restore(self)

    def _train_steps(self, bar, writer: MetricsWriter | None, stop: StopRequest) -> None:
        tc = self.config.train
        while self.state["step"] < self.total_steps:
            record = self.optimizer_step()
            step = record["step"]
            if "loss" in record:
                bar.set_postfix(loss=f"{record['loss']:.4f}", margin=f"{record.get('rewards/margins', 0.0):.3f}",
                                acc=f"{record['rewards/accuracies']:.2f}", tok_s=f"{record['tokens_per_second']:.0f}")
            bar.update(1)
            self.evaluation.at_step(step, self.total_steps, record, self.scorer, self.whole_policy)
            if tc.eval_steps and step % tc.eval_steps == 0 and step < self.total_steps:
                evaluation = self.evaluate()
                if evaluation:
                    self.eval_record["history"].append({"step": step, **evaluation})
                    record.update({f"eval/{k}": v for k, v in evaluation.items()})
            if step % tc.logging_steps == 0 or step == self.total_steps:
                if writer:
                    writer.write(record)
                if tc.report_to:
                    self.engine.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
            saved = None
            if tc.save_steps and step % tc.save_steps == 0 and step < self.total_steps:
                saved = self.save()
            if self.engine.anywhere(stop.signum is not None):
                bar.close()
                raise TrainingInterrupted(stop.signum or signal.SIGTERM, step, saved or self.save())

    # -- the run ------------------------------------------------------------------------------------------

    @contextmanager
    def _interruptible(self, what: str, save: bool = False):
        """Ctrl-C outside the steps (the evaluations before and after them) ends in :class:`TrainingInterrupted`;
        with ``save`` (after the steps, one process) the trained steps are checkpointed first."""
        try:
            yield
        except KeyboardInterrupt:
            log.warning("SIGINT received during %s: stopping", what)
            keep = save and self.engine.accelerator.num_processes == 1
            saved = self.save() if keep else self.resume_from
            raise TrainingInterrupted(signal.SIGINT, self.state["step"], saved, during=what) from None

    def run(self) -> RunResult:
        tc, engine = self.config.train, self.engine
        main = engine.is_main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            resumed_at = None if self.resume_from is None else self.resume_from.name
            record_config(self.config, self.run_dir, resumed_at, finished=resumed_at is not None and
                          checkpoint_step(self.resume_from) >= self.total_steps)
        for line in self.reports:
            log.info("data: %s", line)
        trainable, total = self.param.parameter_counts()
        log.info("parametrization %s: %s trainable of %s parameters (%.4f%%; %s)", self.config.parametrization.name,
                 f"{trainable:,}", f"{total:,}", 100 * trainable / total, self.param.count_convention)
        if self.resume_from is not None:
            self.restore(self.resume_from)
            log.info("resumed from %s at step %d", self.resume_from, self.state["step"])
        with self._interruptible("the preparation before training"):
            if self.resume_from is None:
                self.eval_record["before"] = self.evaluate(policy_is_reference=self.param.starts_at_reference)
            if main and self.state["step"] < self.total_steps:
                check_disk_space(self.run_dir, checkpoint_bytes(self.param.trainable_state_dict(), self.optimizer))
            writer = MetricsWriter(self.run_dir / "metrics.jsonl", self.state["step"]) if main else None
            if tc.report_to:
                engine.accelerator.init_trackers("preflab", config=flat(self.config.to_dict()))
            line = self.evaluation.prepare_diagnostics(self.whole_policy, self.tokenizer, self.state,
                                                       self.run_dir / "probe.jsonl" if main else None, self.scorer)
            if line:
                log.info(line)
            if self.reference.cache is not None and self.reference.precompute_all:
                self.reference.precompute(tc.eval_batch_size, tc.progress)
        self.scorer.train()
        bar = progress(total=self.total_steps, initial=self.state["step"], enabled=tc.progress and main,
                       desc="train", unit="steps", every=tc.logging_steps)
        with StopRequest() as stop:
            self._train_steps(bar, writer, stop)
        bar.close()
        with self._interruptible("the evaluation after training", save=True):
            self.program.finish(self)
            self.eval_record["after"] = self.evaluate()
            if self.eval_record["after"]:  # (a finished run resumed evaluates its last step again: keep one entry)
                self.eval_record["history"] = [h for h in self.eval_record["history"]
                                               if h["step"] != self.state["step"]]
                self.eval_record["history"].append({"step": self.state["step"], **self.eval_record["after"]})
            policy = self.final_policy = self.whole_policy()
            if main:
                result = self.evaluation.generation(self.tokenizer, policy.policy_module(), policy.reference)
                if result is not None:
                    self.eval_record["generation"] = {self.config.eval.task: result}
        self.save()
        if main:
            policy.save_final(self.run_dir / "final")
            self.tokenizer.save_pretrained(self.run_dir / "final")
            write_final_card(self.run_dir / "final", self.config, self.eval_record, self.state["step"])
        for tracker in engine.accelerator.trackers:  # (not end_training: the process group outlives one run)
            tracker.finish()
        return RunResult(self.run_dir, self.state["step"], self.state["seconds"], self.eval_record["before"],
                         self.eval_record["after"], self.eval_record.get("generation", {}).get(self.config.eval.task),
                         nonfinite_skips=self.state.get("nonfinite_skips", 0))
