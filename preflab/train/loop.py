"""The offline schedule: epochs over a fixed preference dataset, on ``accelerate``.

``preflab train configs/dpo.yaml`` runs :func:`train`. One optimizer step = ``grad_accum`` micro-batches
of ``batch_size`` pairs: policy log-probs (one forward for chosen and rejected, in the scorer's layout),
reference log-probs (from the reference cache, or computed by the base with the adapter off or the frozen copy
and then cached), objective, backward; then clipping, AdamW, scheduler.
Held-out pairs are evaluated before training, every ``eval_steps`` and at the end; reference log-probs of
the held-out set are computed once. Checkpoints make the run resumable exactly (``resume: auto``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import signal
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list, set_seed
from tqdm import tqdm
from transformers import get_scheduler

from ..adapters import Parametrization, build_parametrization
from ..config import Config, ConfigError, config_changes, dump_config
from ..data.collate import PreferenceBatch, collate_pairs
from ..data.dataset import load_pairs
from ..data.tokenize import PairTokenizer
from ..eval.diagnostics import ThreeDProbe
from ..eval.energy import EnergyMonitor
from ..eval.generation import GenerationEvaluator
from ..eval.preference import SequenceLogps, preference_metrics, score_pairs
from ..losses import Objective, PairLogps, build_objective
from ..models.loader import load_model, load_tokenizer
from ..models.reference_cache import ReferenceCache, default_cache_dir, model_fingerprint, pair_key
from ..models.scorer import SequenceScorer
from ..optim.merging import MergingOptions, OnDAREAdamW, OnTIESAdamW, task_vectors_by_name
from .checkpoint import begin_checkpoint, commit_checkpoint, list_checkpoints, load_checkpoint, rng_state, set_rng_state
from .engine import (
    check_engine,
    configure_deepspeed,
    gather_named,
    gather_optimizer_state,
    make_accelerator,
    shard_like,
    shard_optimizer_state,
)
from .metrics import MetricAccumulator, MetricsWriter, pair_metrics
from .order import BatchOrder
from .safety import StopRequest, TrainingInterrupted, check_disk_space, checkpoint_bytes

log = logging.getLogger(__name__)


DEEPSPEED_DIR = "deepspeed"  # a checkpoint's DeepSpeed engine files


class TrainingError(RuntimeError):
    """Training cannot continue (a non-finite loss); the message says at which step and on which rows."""


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    seconds: float
    before: dict | None
    after: dict | None
    generation: dict | None = None
    table: str | None = None  # a schedule's own summary (cofs: the forgetting matrix)


def _resume_path(config: Config, run_dir: Path) -> Path | None:
    if config.resume == "never":
        if list_checkpoints(run_dir):
            raise ConfigError(f"resume: output_dir {run_dir} already holds checkpoints; use resume=auto to continue "
                              "that run or choose another output_dir")
        return None
    if config.resume == "auto":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(config.resume)
    if not path.is_dir():
        raise ConfigError(f"resume: checkpoint {path} does not exist")
    return path


def _optimizer(param: Parametrization, config: Config) -> torch.optim.Optimizer:
    trainable = [p for p in param.model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]  # no weight decay on biases and norms
    rest = [p for p in trainable if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.train.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    oc = config.optim
    if oc.name == "adamw":
        return torch.optim.AdamW(groups, lr=config.train.lr, betas=config.train.adam_betas)
    cls = OnDAREAdamW if oc.name == "ondare_adamw" else OnTIESAdamW
    options = MergingOptions(**{f.name: getattr(oc, f.name) for f in dataclasses.fields(MergingOptions)})
    try:
        taus = _task_vectors(param, oc.base_model, oc.sft_model or config.model.name)
        optimizer = cls(groups, taus, lr=config.train.lr, betas=config.train.adam_betas, options=options)
    except ValueError as e:
        raise ConfigError(f"optim: {e}") from None
    log.info("optimizer %s: task vectors for %d of %d trainable tensors, %.1f MB held in the optimizer state "
             "(p=%g, alpha=%g)", oc.name, len(taus), len(trainable), optimizer.task_vector_bytes() / 2**20,
             oc.reserve_p, oc.alpha)
    return optimizer


def _task_vectors(param: Parametrization, base_name: str, sft_name: str) -> dict:
    """τ = θ_SFT − θ_base for the policy's trainable tensors; both models are freed before training starts."""
    base = load_model(base_name).state_dict()
    sft = load_model(sft_name).state_dict()
    taus = task_vectors_by_name(param.model.named_parameters(), base, sft)
    if not taus:
        raise ValueError(f"no trainable tensor of the policy matches a tensor of {sft_name}: adapter_mode full_only "
                         "merges full weights only (the paper's setting); use parametrization.kind=full")
    return taus


@contextmanager
def eval_mode(module: torch.nn.Module):
    """Dropout off for a forward that must be deterministic (reference, evaluation); restores the mode."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def _flat(tree: dict, prefix: str = "") -> dict:
    """Dotted keys and scalar values: what trackers accept as hyperparameters."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    out.update(_flat(item, f"{prefix}{key}.{i}."))
                else:
                    out[f"{prefix}{key}.{i}"] = item
        else:
            out[f"{prefix}{key}"] = "null" if value is None else value
    return out


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def record_config(config: Config, run_dir: Path, resumed_at: str | None) -> None:
    """Writes config.yaml; a resumed run whose config changed keeps the old file (``config.before-<resumed_at>.yaml``)
    and logs the changes."""
    path = run_dir / "config.yaml"
    if resumed_at is not None and path.is_file():
        changed = [c for c in config_changes(yaml.safe_load(path.read_text()) or {}, config.to_dict())
                   if not c.startswith(("resume:", "train.progress:"))]
        if changed:
            keep = run_dir / f"config.before-{resumed_at}.yaml"
            path.replace(keep)
            log.warning("resuming with a changed config (the old one is kept as %s): %s", keep.name, "; ".join(changed))
    dump_config(config, path)


class OfflineRun:
    """Everything one offline run holds; :meth:`run` trains it to the end (or resumes it)."""

    def __init__(self, config: Config):
        self.config = config
        self.run_dir = Path(config.output_dir)
        self.resume_from = _resume_path(config, self.run_dir)  # config errors before any work
        tc = config.train
        # accelerate keeps one AcceleratorState per process; several runs in a process (tests, schedules
        # that chain runs) may differ in precision. The process-group state (PartialState) is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
        check_engine(config)
        self.accelerator, self.engine = make_accelerator(
            mixed_precision="bf16" if tc.precision == "bf16" else "no", log_with=list(tc.report_to) or None,
            project_dir=str(self.run_dir))
        self.sharded = self.engine.shards_weights  # each process holds shards of the weights (FSDP, ZeRO-3)
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        log.info("engine %s%s: %d process%s", self.engine.name,
                 f" ZeRO-{self.engine.zero_stage}" if self.engine.name == "deepspeed" else "", self.world,
                 "es" if self.world > 1 else "")
        if self.engine.name == "deepspeed":
            configure_deepspeed(self.accelerator, tc)
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
        with self.engine.plain_models():
            model = load_model(config.model.name, config.model.dtype, config.model.attn_implementation)
        if tc.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.param = self.build_parametrization(model)
        self.objective: Objective = build_objective([t.to_dict() for t in config.loss])
        self.train_keys = [pair_key(p) for p in self.train_pairs]
        self.ref_cache = None  # opened before the weights are prepared (sharded under FSDP and ZeRO-3)
        if config.scorer.reference_cache != "none" and not self.objective.reference_free:
            self.ref_cache = self._open_reference_cache()
        # a global batch of batch_size pairs per process; process r takes every world-th pair of it
        self.order = BatchOrder(len(self.train_pairs), tc.batch_size * self.world, config.seed)
        self.total_steps = tc.max_steps or math.ceil(tc.epochs * self.order.batches_per_epoch / tc.grad_accum)
        self.optimizer = self.build_optimizer()
        self.scheduler = get_scheduler(tc.lr_scheduler, self.optimizer,
                                       num_warmup_steps=round(tc.warmup_ratio * self.total_steps),
                                       num_training_steps=self.total_steps)
        self.scorer, self.optimizer = self.accelerator.prepare(
            SequenceScorer(self.param.model, config.scorer.chunk_size), self.optimizer)
        self.param.place(self.accelerator.device)
        self.pad_id = self.tokenizer.pad_token_id
        self.state = {"step": 0, "micro": 0, "tokens": 0, "seconds": 0.0}
        self.eval_record: dict = {"before": None, "history": [], "after": None}
        self._eval_reference: SequenceLogps | None = None
        self.probe = None
        if config.diag.enabled and config.diag.probe_kind != "none" and not self.objective.reference_free:
            heldout = list(dict.fromkeys(p.prompt_ids for p in self.eval_pairs))  # unique, in order
            self.probe = ThreeDProbe(config.diag, self.train_pairs, heldout, config.seed, self.pad_id,
                                     tc.eval_batch_size)
        self.energy = EnergyMonitor(config.diag.he_modules, config.diag.he_chunk) \
            if config.diag.enabled and config.diag.he_every != 0 else None

    def build_parametrization(self, model: torch.nn.Module) -> Parametrization:
        return build_parametrization(self.config.parametrization.name, self.config.parametrization.params, model)

    def build_optimizer(self) -> torch.optim.Optimizer:
        return _optimizer(self.param, self.config)

    # -- pieces of a step ---------------------------------------------------------------------------------

    def collate(self, indices: list[int]) -> PreferenceBatch:
        sc = self.config.scorer
        pairs = [self.train_pairs[i] for i in indices]
        return collate_pairs(pairs, self.pad_id, sc.layout, sc.pack_tokens).to(self.accelerator.device)

    def _open_reference_cache(self) -> ReferenceCache:
        t0 = time.perf_counter()
        trainable = {id(p) for p in self.param.model.parameters() if p.requires_grad}
        with self.param.reference() as ref:
            fingerprint = model_fingerprint(ref, self.config.train.precision, trainable)
        dataset = hashlib.blake2b(b"".join(self.train_keys), digest_size=8).hexdigest()
        directory = Path(self.config.scorer.reference_cache_dir or default_cache_dir())
        cache = ReferenceCache(directory, fingerprint, f"{dataset}-rank{self.rank}")
        log.info("reference cache %s: %d pairs known (%.1f s to fingerprint and read)", cache.dir, len(cache),
                 time.perf_counter() - t0)
        return cache

    @contextmanager
    def reference_scorer(self):
        """The reference as a scorer. Under FSDP and ZeRO-3, when it is the policy's own network with the trained part
        switched off, that is the prepared scorer (under FSDP only its root gathers the sharded embeddings and head);
        its forward is then a collective, which :meth:`reference_logps` and :meth:`precompute_reference` run on every
        process alike. Otherwise a plain scorer: no collective (DDP's wrapper would broadcast buffers)."""
        with self.param.reference() as ref:
            sharded = self.sharded and ref is self.param.model
            yield self.scorer if sharded else SequenceScorer(ref, self.config.scorer.chunk_size)

    def _reference_forward(self, batch: PreferenceBatch) -> torch.Tensor:
        with torch.no_grad(), self.reference_scorer() as ref, eval_mode(ref), self.accelerator.autocast():
            return ref(**batch.scorer_inputs())[0]

    def reference_logps(self, indices: list[int], batch: PreferenceBatch) -> torch.Tensor | None:
        """(2B,) reference log-probs of the batch's chosen then rejected: from the cache, the missing ones computed
        (and cached)."""
        if self.objective.reference_free:
            return None
        if self.ref_cache is None:
            return self._reference_forward(batch)
        keys = [self.train_keys[i] for i in indices]
        values, missing = self.ref_cache.lookup(keys)
        if self.sharded and self._anywhere(bool(missing)):  # a collective forward: all processes or none
            missing = list(range(len(keys)))
        if missing:
            sub = batch if len(missing) == len(indices) else self.collate([indices[j] for j in missing])
            logps, m = self._reference_forward(sub).float().cpu(), len(missing)
            self.ref_cache.add([keys[j] for j in missing], logps[:m], logps[m:])
            values[missing] = torch.stack([logps[:m], logps[m:]], dim=1)
        return torch.cat([values[:, 0], values[:, 1]]).to(self.accelerator.device)

    def precompute_reference(self) -> None:
        """Fills the cache with every training pair (each process a share), then reads back all processes' files."""
        own = range(self.rank, len(self.train_pairs), self.world)
        todo = sorted((i for i in own if self.train_keys[i] not in self.ref_cache.values),
                      key=lambda i: self.train_pairs[i].num_tokens)
        t0, bs = time.perf_counter(), self.config.train.eval_batch_size
        chunks = [todo[start:start + bs] for start in range(0, len(todo), bs)]
        if self.sharded:  # the same number of (collective) forwards on every process: the short ones repeat one
            most = int(self.accelerator.gather(torch.tensor([len(chunks)], device=self.accelerator.device)).max())
            chunks += [chunks[-1] if chunks else [own[0] if own else 0]] * (most - len(chunks))
        for chunk in tqdm(chunks, desc="reference", unit="batch",
                          disable=not (self.config.train.progress and self.accelerator.is_main_process)):
            self.reference_logps(chunk, self.collate(chunk))
        self.ref_cache.save()
        self.accelerator.wait_for_everyone()
        self.ref_cache.read()  # the other processes' shares
        log.info("reference log-probs of %d pairs computed in %.1f s", len(todo), time.perf_counter() - t0)

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
            raise TrainingError(f"{what} {where}: more than train.max_nonfinite_skips={tc.max_nonfinite_skips} "
                                "updates skipped; stopping (the last checkpoint holds finite weights)")

    def _reduce(self, record: dict, weight: float = 1.0, how: str = "mean") -> dict:
        """Metrics of this process's share → metrics of the global batch: the ``weight``-weighted mean (weight:
        this process's pairs) or the sum over processes."""
        if self.world == 1 or not record:
            return record
        keys = sorted(record)
        values = torch.tensor([float(record[k]) * weight for k in keys] + [weight], dtype=torch.float64,
                              device=self.accelerator.device)
        total = self.accelerator.reduce(values, "sum").tolist()
        return {k: v / total[-1] if how == "mean" else v for k, v in zip(keys, total[:-1])}

    def _anywhere(self, flag: bool) -> bool:
        """True when ``flag`` holds on any process (decisions that every process must take together)."""
        if self.world == 1:
            return flag
        return bool(self.accelerator.reduce(torch.tensor([float(flag)], device=self.accelerator.device), "sum") > 0)

    def micro_step(self, indices: list[int], global_size: int, sync: bool, scale: float) -> dict | None:
        """Forward and backward of this process's share of a micro-batch of ``global_size`` pairs; None when the
        loss was not finite (on any process) and skipping is on."""
        batch = self.collate(indices)
        ref = self.reference_logps(indices, batch)
        b = batch.num_pairs
        with (nullcontext() if sync else self.accelerator.no_sync(self.scorer)), self.accelerator.autocast():
            logps, counts = self.scorer(**batch.scorer_inputs())
            pair = PairLogps(logps[:b], logps[b:], None if ref is None else ref[:b], None if ref is None else ref[b:],
                             counts[:b], counts[b:])
            out = self.objective(pair)
            # the mean over the global micro-batch once DDP averages the gradients of the processes
            loss = out.losses.sum() / global_size * self.world
            if self._anywhere(not torch.isfinite(loss).item()):
                self._nonfinite(f"non-finite loss ({out.losses.mean().item()})", indices)
                return None
            self.backward(loss * scale, sync)
        self.state["tokens"] += batch.num_tokens
        return pair_metrics(pair, out)

    def backward(self, loss: torch.Tensor, sync: bool) -> None:
        """Backward of one micro-batch (``sync``: the last of the update). Under DeepSpeed the engine also clips and
        updates at the last one (its boundary set from ``sync``, the loss already scaled for the accumulation)."""
        if self.engine.owns_step:
            self.scorer.set_gradient_accumulation_boundary(sync)
            self.scorer.backward(loss, scale_wrt_gas=False)
            self.scorer.step()
        else:
            self.accelerator.backward(loss)

    def clip_gradients(self, max_norm: float, record: dict) -> float:
        """Clips the trainable gradients to ``max_norm`` (inf: measures only); returns the norm before clipping."""
        if self.engine.owns_step:  # DeepSpeed clipped (train.max_grad_norm) when it updated, in the last backward
            return float(self.scorer.get_global_grad_norm())
        params = [p for p in self.param.model.parameters() if p.requires_grad]
        return float(self.accelerator.clip_grad_norm_(params, max_norm))

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
        record = self._reduce(acc.mean(), weight=len(seen))
        if not skip:
            norm = self.clip_gradients(tc.max_grad_norm or math.inf, record)
            if math.isfinite(norm):
                record["grad_norm"] = norm
            else:
                self._nonfinite(f"non-finite gradient (norm {norm})", seen)
                skip = True
        record["lr"] = self.scheduler.get_last_lr()[0]
        if skip:
            record["nonfinite_skipped"] = 1
        else:
            self.optimizer.step()
        with warnings.catch_warnings():  # torch warns when the very first update was the skipped one
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            self.scheduler.step()  # a skipped update still counts as a step: the schedule keeps its length
        self.optimizer.zero_grad(set_to_none=True)
        self.state["step"] += 1
        seconds = time.perf_counter() - t0
        self.state["seconds"] += seconds
        record["step_seconds"] = seconds
        tokens = self._reduce({"t": self.state["tokens"] - tokens_before}, how="sum")["t"]  # all processes
        record["tokens_per_second"] = tokens / seconds
        record["epoch"] = self.state["micro"] / self.order.batches_per_epoch
        return {"step": self.state["step"], **record}

    def finish_training(self) -> None:
        """Called once the last step is done, before the final evaluation and export (schedules hook in here)."""

    # -- evaluation and checkpoints -----------------------------------------------------------------------

    def score(self, scorer: torch.nn.Module, pairs: list) -> SequenceLogps:
        """Gradient-free log-probs of ``pairs`` in eval batches and the configured layout."""
        sc = self.config.scorer
        return score_pairs(scorer, pairs, self.config.train.eval_batch_size, self.pad_id, self.accelerator.device,
                           sc.layout, sc.pack_tokens)

    def evaluate(self, policy_is_reference: bool = False) -> dict | None:
        if not self.eval_pairs:
            return None
        if self._eval_reference is None:
            with self.reference_scorer() as ref, eval_mode(ref), self.accelerator.autocast():
                self._eval_reference = self.score(ref, self.eval_pairs)
        if policy_is_reference:
            policy = self._eval_reference
        else:
            with eval_mode(self.scorer), self.accelerator.autocast():
                policy = self.score(self.scorer, self.eval_pairs)
        return preference_metrics(self.objective, policy, self._eval_reference)

    def measure_probe(self, log_grad_ratio: float | None) -> dict:
        t0 = time.perf_counter()
        with eval_mode(self.scorer), self.accelerator.autocast():
            out = self.probe.measure(self.scorer, self.accelerator.device, log_grad_ratio)
        out["3d/probe_seconds"] = time.perf_counter() - t0
        return out

    def save(self) -> Path | None:
        path = None
        if self.ref_cache is not None:  # every process writes its own file
            self.ref_cache.save()
        main = self.accelerator.is_main_process
        trainable = self.trainable_state(keep=main)
        bad = [n for n, t in trainable.items() if not torch.isfinite(t).all()]
        if self._anywhere(bool(bad)):  # never a checkpoint a resume would have to throw away
            raise TrainingError(f"refusing to write the checkpoint of step {self.state['step']}: non-finite values in "
                                f"{bad[:3]}{' and more' if len(bad) > 3 else ''}; the previous checkpoint is intact")
        optimizer = None if self.engine.owns_step else self.optimizer.state_dict()
        if self.sharded and optimizer is not None:
            optimizer = gather_optimizer_state(optimizer, keep=main)
        rng = rng_state()
        if self.world > 1:  # every process's generators: their dropout masks differ with their batches
            states = [None] * self.world
            torch.distributed.all_gather_object(states, rng)
            rng = {"processes": states}
        tmp = begin_checkpoint(self.run_dir, self.state["step"]) if main else None
        if self.engine.owns_step:  # DeepSpeed: every process writes its optimizer partition into the main's directory
            tmp = broadcast_object_list([tmp])[0]
            self.scorer.save_checkpoint(str(tmp / DEEPSPEED_DIR), tag="state", save_latest=False,
                                        exclude_frozen_parameters=True)
            self.accelerator.wait_for_everyone()
        if main:
            path = commit_checkpoint(tmp, self.run_dir, self.state["step"], trainable, optimizer,
                                     self.scheduler.state_dict(), dict(self.state), self.config.train.save_total_limit,
                                     rng)
            _write_json(self.run_dir / "eval.json", self.eval_record)
        self.accelerator.wait_for_everyone()
        return path

    def trainable_state(self, keep: bool = True) -> dict[str, torch.Tensor]:
        """The trained tensors, whole (gathered from the shards under FSDP and ZeRO-3: a collective, every process
        calls it); where not ``keep``, an empty dict."""
        if self.sharded:  # the parameters themselves: a detached ZeRO-3 parameter no longer knows its partitions
            return gather_named(self.param.trainable_parameters(), keep)
        return self.param.trainable_state_dict()

    def whole_policy(self) -> Parametrization | None:
        """The trained policy with whole weights, for generation and ``final/``: the parametrization itself, or under
        FSDP and ZeRO-3 an unsharded copy that the main process builds from the gathered trained tensors (None
        elsewhere)."""
        if not self.sharded:
            return self.param
        state = self.trainable_state(keep=self.accelerator.is_main_process)
        if not self.accelerator.is_main_process:
            return None
        mc = self.config.model
        with self.engine.plain_models():
            policy = self.build_parametrization(load_model(mc.name, mc.dtype, mc.attn_implementation))
        policy.load_trainable_state_dict(state)
        policy.place(self.accelerator.device)
        return policy

    def _check_engine_of(self, path: Path) -> None:
        """A DeepSpeed checkpoint's optimizer state is DeepSpeed's, partitioned over its processes: it resumes under
        DeepSpeed with as many processes, and a checkpoint of another engine does not resume under DeepSpeed."""
        parts = len(list((path / DEEPSPEED_DIR).glob("state/*optim_states.pt")))
        if self.engine.owns_step and parts != self.world:
            written = f"under DeepSpeed with {parts} processes" if parts else "without DeepSpeed"
            raise ConfigError(f"resume: {path} was written {written}; under DeepSpeed resume it with that engine and "
                              "number of processes (or start a new output_dir)")
        if not self.engine.owns_step and parts:
            raise ConfigError(f"resume: {path} was written under DeepSpeed (its optimizer state is DeepSpeed's, "
                              f"partitioned over {parts} processes); resume it under DeepSpeed with {parts} processes")

    def restore(self, path: Path) -> None:
        ckpt = load_checkpoint(path)
        self._check_engine_of(path)
        if self.engine.owns_step:  # DeepSpeed's files: the trained weights and this process's optimizer partition
            self.scorer.load_checkpoint(str(path / DEEPSPEED_DIR), tag="state", load_module_strict=False,
                                        load_optimizer_states=True, load_lr_scheduler_states=False)
        else:
            optimizer = ckpt["optimizer"]
            if self.sharded:  # the checkpoint holds whole tensors: this process takes its shards
                params = dict(self.param.model.named_parameters())
                ckpt["trainable"] = {n: shard_like(t, params[n]) if n in params else t
                                     for n, t in ckpt["trainable"].items()}
                optimizer = shard_optimizer_state(optimizer,
                                                  [p for g in self.optimizer.param_groups for p in g["params"]])
            self.param.load_trainable_state_dict(ckpt["trainable"])
            self.optimizer.load_state_dict(optimizer)
        self.scheduler.load_state_dict(ckpt["scheduler"])
        rng = ckpt["rng"]
        if "processes" in rng:
            states = rng["processes"]
            if len(states) != self.world:
                log.warning("resume: the checkpoint holds the random states of %d processes, this run has %d; "
                            "process %d takes those of process %d (dropout masks will differ from the first run)",
                            len(states), self.world, self.rank, self.rank % len(states))
            rng = states[self.rank % len(states)]
        set_rng_state(rng)
        self.state = ckpt["state"]
        eval_path = self.run_dir / "eval.json"
        if eval_path.is_file():
            self.eval_record = json.loads(eval_path.read_text())
            self.eval_record["history"] = [h for h in self.eval_record["history"] if h["step"] <= self.state["step"]]
            self.eval_record["after"] = None
            self.eval_record.pop("generation", None)

    def _train_steps(self, bar: tqdm, writer: MetricsWriter | None, stop: StopRequest) -> None:
        tc = self.config.train
        while self.state["step"] < self.total_steps:
            record = self.optimizer_step()
            step = record["step"]
            bar.update(1)
            if "loss" in record:
                bar.set_postfix(loss=f"{record['loss']:.4f}", margin=f"{record.get('rewards/margins', 0.0):.3f}",
                                acc=f"{record['rewards/accuracies']:.2f}", tok_s=f"{record['tokens_per_second']:.0f}")
            probe_every = self.config.diag.probe_every or tc.logging_steps
            if self.probe is not None and (step % probe_every == 0 or step == self.total_steps):
                record.update(self.measure_probe(record.get("3d/log_grad_ratio")))
            he_every = self.config.diag.he_every or probe_every
            if self.energy is not None and (step % he_every == 0 or step == self.total_steps):
                record.update(self.energy.measure(self.param.model))
            if tc.eval_steps and step % tc.eval_steps == 0 and step < self.total_steps:
                evaluation = self.evaluate()
                if evaluation:
                    self.eval_record["history"].append({"step": step, **evaluation})
                    record.update({f"eval/{k}": v for k, v in evaluation.items()})
            if step % tc.logging_steps == 0 or step == self.total_steps:
                if writer:
                    writer.write(record)
                if tc.report_to:
                    self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
            saved = None
            if tc.save_steps and step % tc.save_steps == 0 and step < self.total_steps:
                saved = self.save()
            if self._anywhere(stop.signum is not None):
                bar.close()
                raise TrainingInterrupted(stop.signum or signal.SIGTERM, step, saved or self.save())

    # -- the run ------------------------------------------------------------------------------------------

    def run(self) -> RunResult:
        tc, main = self.config.train, self.accelerator.is_main_process
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            record_config(self.config, self.run_dir, None if self.resume_from is None else self.resume_from.name)
        for line in self.reports:
            log.info("data: %s", line)
        trainable, total = self.param.parameter_counts()
        log.info("parametrization %s: %s trainable of %s parameters (%.4f%%; %s)", self.config.parametrization.name,
                 f"{trainable:,}", f"{total:,}", 100 * trainable / total, self.param.count_convention)
        if self.resume_from is not None:
            self.restore(self.resume_from)
            log.info("resumed from %s at step %d", self.resume_from, self.state["step"])
        else:
            self.eval_record["before"] = self.evaluate(policy_is_reference=self.param.starts_at_reference)
        if main and self.state["step"] < self.total_steps:
            check_disk_space(self.run_dir, checkpoint_bytes(self.param.trainable_state_dict(), self.optimizer))
        writer = MetricsWriter(self.run_dir / "metrics.jsonl", self.state["step"]) if main else None
        if tc.report_to:
            self.accelerator.init_trackers("preflab", config=_flat(self.config.to_dict()))
        if self.probe is not None:
            t0 = time.perf_counter()
            self.probe.prepare(self.param.reference, self.tokenizer, self.accelerator.device,
                               self.config.scorer.chunk_size, cache=self.run_dir / "probe.jsonl" if main else None)
            self.probe.history = self.state.setdefault("diag_history", [])
            if not self.probe.history:  # the starting point of every curve (zero when the policy is the reference)
                self.measure_probe(None)
            log.info("3D diagnostics: %d seen pairs, %d probe responses (%.1f s to prepare)",
                     len(self.probe.seen_rows) // 2, len(self.probe.probe_rows), time.perf_counter() - t0)
        if self.energy is not None:
            self.energy.prepare(self.param.reference)
        if self.ref_cache is not None and self.config.scorer.reference_cache == "precompute":
            self.precompute_reference()
        self.scorer.train()
        bar = tqdm(total=self.total_steps, initial=self.state["step"], disable=not (tc.progress and main),
                   desc="train", unit="step")
        with StopRequest() as stop:
            self._train_steps(bar, writer, stop)
        bar.close()
        self.finish_training()
        self.eval_record["after"] = self.evaluate()
        if self.eval_record["after"]:  # (a finished run resumed evaluates its last step again: keep one entry)
            self.eval_record["history"] = [h for h in self.eval_record["history"] if h["step"] != self.state["step"]]
            self.eval_record["history"].append({"step": self.state["step"], **self.eval_record["after"]})
        policy = self.whole_policy()
        if self.config.eval.task and main:
            evaluator = GenerationEvaluator(self.tokenizer, self.config.eval)
            with self.engine.plain_models():  # the main process alone
                result = evaluator.evaluate(policy.model, policy.reference)
            self.eval_record["generation"] = {self.config.eval.task: result}
        self.save()
        if main:
            policy.save_final(self.run_dir / "final")
            self.tokenizer.save_pretrained(self.run_dir / "final")
        if tc.report_to:
            self.accelerator.end_training()
        return RunResult(self.run_dir, self.state["step"], self.state["seconds"], self.eval_record["before"],
                         self.eval_record["after"], self.eval_record.get("generation", {}).get(self.config.eval.task))


def train(config: Config) -> RunResult:
    """Runs ``config`` under its schedule: ``offline`` (this module), ``apo`` (preflab.train.apo), ``ofs``
    (preflab.train.ofs) or ``cofs`` (preflab.train.cofs)."""
    check_engine(config)  # before any work: what FSDP and DeepSpeed refuse
    if config.schedule == "apo":
        from .apo import ApoRun

        return ApoRun(config).run()
    if config.schedule == "ofs":
        from .ofs import OfsRun

        return OfsRun(config).run()
    if config.schedule == "cofs":
        from .cofs import DomainsRun

        return DomainsRun(config).run()
    return OfflineRun(config).run()
