"""APO: iterative preference optimization with Nesterov extrapolation (He et al., arXiv 2410.06293).

``schedule: apo`` (spec: methods/apo.md). For t = 0..T (``apo.iterations`` = T+1), in ``<output_dir>/iter-<t+1>/``:

1. ``pairs/``: ``apo.k`` samples per prompt of the iteration's prompt slice from π_{θ_t}, scored by the reward;
   the best and the worst of each prompt make a pair (ties dropped). Resumable batch by batch.
2. ``train/``: an offline run of the configured objective, parametrization and optimizer that starts from
   θ_t and references θ_t (β from ``apo.beta``); optimizer and LR schedule start afresh. Resumable by checkpoint.
   ``policy/`` = θ̂_{t+1}, the trained policy with dense weights (plain ``transformers``).
3. ``extrapolated/`` = θ_{t+1} = θ̂_{t+1} + α·(θ̂_{t+1} − θ̂_t), computed in fp32 on every weight. The anchor is the
   previous DPO output θ̂_t (θ̂_0 = the starting model), not θ_t. Iteration t+1 samples from, starts at and
   references θ_{t+1}. Nothing is extrapolated after the last iteration (``apo.return_extrapolated``), and with
   α = 0 nothing is computed at all: the next iteration starts from ``policy/`` (plain iterative DPO).
4. ``eval.json``: generation eval of θ̂_{t+1} against the starting model θ_0 (``eval.task``); ``done.json`` last.

An interrupted run skips every iteration that has ``done.json`` and resumes the unfinished one where it stopped.
Under several processes (DDP, FSDP, DeepSpeed) the training runs under that engine; sampling, the KL estimate, the
generation eval and the extrapolation run on the main process with whole weights (the run's ``final_policy``: under
sharding the copy gathered from the shards) while the others wait at a barrier, and the main process alone writes.
Adapters (LoRA, RoPO) are extrapolated on their merged weights W_0 + ΔW, never on their factors (the product is
bilinear in them); each iteration trains a fresh adapter on the dense θ_t — the spec's ``merged`` realisation.
``metrics.jsonl`` holds one ``apo/`` record per iteration; ``final/`` is the returned model.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from torch import Tensor

from ..config import Config, ConfigError
from ..data.build import BuildConfig, build_pairs
from ..eval.generation import GenerationEvaluator
from ..models.generate import SamplingConfig
from ..models.loader import load_model, load_tokenizer
from ..models.scorer import SequenceScorer, eval_mode
from ..tasks import get_task
from .engine import cpu_processes
from .loop import TrainingRun
from .model_card import write_final_card
from .outputs import RunResult, TrainingError, copy_dir_atomically, record_config, save_model_atomically, write_json
from .schedules import pin_for_inner_runs, register_schedule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApoSettings:
    """The iterative schedule (``schedule: apo``, preflab.train.apo): sample → score → pair → train → extrapolate.

    ``alpha: 0`` is plain iterative DPO. The spec is ../methods/apo.md (He et al., arXiv 2410.06293)."""

    iterations: int = 3  # T+1 DPO iterations
    alpha: float = 0.3  # Nesterov extrapolation θ_{t+1} = θ̂_{t+1} + α(θ̂_{t+1} − θ̂_t); 0: iterative DPO
    task: str = "sentiment"  # the prompts sampled each iteration (its train split)
    reward: str | None = None  # judge of the samples: a reward name or rm:PATH; null: the task's gold reward
    prompts_per_iteration: int = 64
    prompt_schedule: str = field(default="disjoint", metadata={"choices": ("disjoint", "reuse")})
    k: int = 5  # samples per prompt; the best and the worst make the pair
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 256
    batch_prompts: int = 16  # prompts per generate call
    min_score_gap: float = 0.0  # drop a prompt when best − worst <= this
    beta: float | tuple[float, ...] | None = None  # per-iteration β (one value or one per iteration); null: the loss's
    epochs_per_iteration: float = 1.0  # inner training (train.max_steps, when set, wins)
    return_extrapolated: bool = False  # also extrapolate after the last iteration and return that
    eval_extrapolated: bool = False  # also run the generation eval on θ_{t+1} (the paper evaluates both)
    # merged: fold θ_t into dense weights each iteration, fresh adapter on top (exact in fp32; needs an
    # unquantized base). The spec's rank-stacking `stacked` realisation is not implemented.
    lora_extrapolation: str = field(default="merged", metadata={"choices": ("merged",)})
    # the offline-like schedule each iteration trains with (offline: DPO; ofs: OFS-DPO, its settings in ofs:); the
    # extrapolation acts on the policy it returns (OFS: the exported module)
    inner: str = "offline"

    def __post_init__(self) -> None:
        from .schedules import schedule_registry

        inner = schedule_registry().get(self.inner)
        if inner is None or inner.program is None:
            offline_like = sorted(n for n, s in schedule_registry().items() if s.program is not None)
            raise ValueError(f"inner: expected an offline-like schedule, one of {offline_like}; got {self.inner!r}")
        for name in ("iterations", "prompts_per_iteration", "k", "max_new_tokens", "batch_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.k < 2:
            raise ValueError(f"k: must be >= 2 (a pair needs two samples), got {self.k}")
        if not 0 <= self.alpha < 1:
            raise ValueError(f"alpha: must be in [0, 1), got {self.alpha}")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature/top_p: need temperature > 0 and top_p in (0, 1], got {self.temperature}, "
                             f"{self.top_p}")
        if self.epochs_per_iteration <= 0:
            raise ValueError(f"epochs_per_iteration: must be > 0, got {self.epochs_per_iteration}")
        betas = self.beta if isinstance(self.beta, tuple) else ()
        if isinstance(self.beta, tuple) and len(betas) != self.iterations:
            raise ValueError(f"beta: expected one value or {self.iterations} (one per iteration), got {len(betas)}")
        if any(b <= 0 for b in betas) or (isinstance(self.beta, float) and self.beta <= 0):
            raise ValueError(f"beta: must be > 0, got {self.beta}")
        from ..tasks import task_names

        if self.task not in task_names():
            raise ValueError(f"task: unknown task {self.task!r}; expected one of {task_names()}")

    def beta_at(self, iteration: int) -> float | None:
        """β of iteration ``iteration`` (0-based); None: keep the objective's."""
        return self.beta[iteration] if isinstance(self.beta, tuple) else self.beta


def dense_state(model: torch.nn.Module) -> dict[str, Tensor]:
    """Every floating-point tensor of a plain model's state dict, as an fp32 CPU copy."""
    return {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in model.state_dict().items()
            if v.is_floating_point()}


def extrapolate(new: dict[str, Tensor], prev: dict[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """θ = new + α·(new − prev) = (1+α)·new − α·prev per tensor, in fp32 at least; α = 0 returns ``new`` itself."""
    if alpha == 0:
        return new
    missing = [k for k in new if k not in prev]
    if missing:
        raise ValueError(f"extrapolation anchor lacks tensors {missing[:3]}: the two models differ in architecture")
    out = {}
    for k, v in new.items():
        dtype = torch.promote_types(v.dtype, torch.float32)
        out[k] = v.to(dtype) + alpha * (v.to(dtype) - prev[k].to(dtype))
    return out


class ApoRun:
    """One APO run; :meth:`run` does (or finishes) every iteration."""

    def __init__(self, config: Config):
        self.config, self.ac = config, config.apo
        self.run_dir = Path(config.output_dir)
        self.processes = PartialState(cpu=cpu_processes())  # the process group (one process: a no-op)
        self.main = self.processes.is_main_process
        ac = self.ac
        available = len(get_task(ac.task).prompts("train", config.seed))
        needed = ac.prompts_per_iteration * (ac.iterations if ac.prompt_schedule == "disjoint" else 1)
        if needed > available:
            raise ConfigError(f"apo.prompts_per_iteration: {ac.iterations} disjoint slices of "
                              f"{ac.prompts_per_iteration} prompts need {needed}, task {ac.task!r} has {available} "
                              "training prompts; lower it or use apo.prompt_schedule=reuse")
        if ac.beta is not None:  # apo.beta acts on every term with a β (Flex-DPO: both, their ratio kept) or is refused
            terms = [t.params.with_beta(ac.beta_at(0)) for t in config.loss]
            if all(t is None for t in terms):
                raise ConfigError(f"apo.beta: no term of the objective ({', '.join(t.name for t in config.loss)}) has "
                                  "a beta to set; leave apo.beta null")
        self.tokenizer = load_tokenizer(config.model.name)
        self.evaluator = GenerationEvaluator(self.tokenizer, config.eval) if config.eval.task else None
        self._base = None  # θ_0, loaded when first needed (generation-eval reference, first anchor)

    # -- paths --------------------------------------------------------------------------------------------

    def iteration_dir(self, t: int) -> Path:
        return self.run_dir / f"iter-{t + 1}"

    def start_model(self, t: int) -> str:
        """Where θ_t lives: the configured model for t = 0, else the previous iteration's output."""
        if t == 0:
            return self.config.model.name
        prev = self.iteration_dir(t - 1)
        return str(prev / ("extrapolated" if self.ac.alpha > 0 else "policy"))

    def base(self) -> torch.nn.Module:
        if self._base is None:
            self._base = load_model(self.config.model.name, self.config.model.dtype,
                                    self.config.model.attn_implementation).eval().requires_grad_(False)
        return self._base

    # -- one iteration ------------------------------------------------------------------------------------

    def inner_config(self, t: int, pairs: Path) -> Config:
        c, ac = pin_for_inner_runs(self.config), self.ac
        beta = ac.beta_at(t)
        loss = c.loss if beta is None else tuple(
            dataclasses.replace(term, params=term.params.with_beta(beta) or term.params) for term in c.loss)
        return dataclasses.replace(
            c.with_schedule(ac.inner), resume="auto", output_dir=str(self.iteration_dir(t) / "train"), loss=loss,
            model=dataclasses.replace(c.model, name=self.start_model(t)),
            data=dataclasses.replace(c.data, train=str(pairs)),
            train=dataclasses.replace(c.train, epochs=ac.epochs_per_iteration),
            eval=dataclasses.replace(c.eval, task=None))  # the driver evaluates against θ_0, not θ_t

    def sample_pairs(self, t: int) -> dict:
        c, ac = self.config, self.ac
        offset = t * ac.prompts_per_iteration if ac.prompt_schedule == "disjoint" else 0
        cfg = BuildConfig(task=ac.task, split="train", model=self.start_model(t), num_prompts=ac.prompts_per_iteration,
                          offset=offset, k=ac.k, min_gap=ac.min_score_gap, batch_prompts=ac.batch_prompts,
                          seed=c.seed, sample_seed=c.seed * 1000 + t, reward=ac.reward,
                          sampling=SamplingConfig(ac.max_new_tokens, ac.temperature, ac.top_p))
        out = self.iteration_dir(t) / "pairs"
        if self.main:  # the others wait (sampling is not sharded yet)
            build_pairs(cfg, out, tokenizer=self.tokenizer, progress=c.train.progress)
        self.processes.wait_for_everyone()
        stats = json.loads((out / "train.stats.json").read_text())
        if stats["pairs"] == 0:
            raise TrainingError(f"apo iteration {t + 1}: no pair from {stats['prompts']} prompts (every prompt's "
                                f"best and worst of k={ac.k} samples tied); raise apo.k or apo.temperature")
        return stats

    def kl_to_prev(self, run: TrainingRun) -> float:
        """KL(π_t ‖ π̂_{t+1}) estimated on the iteration's pair responses (samples of π_t: its best and worst), with
        the trained policy's whole weights (main process)."""
        chunk, whole = self.config.scorer.chunk_size, run.final_policy
        with torch.no_grad(), eval_mode(whole.model):
            policy = run.evaluation.score(SequenceScorer(whole.model, chunk), run.train_pairs)
            with whole.reference() as ref, eval_mode(ref):
                ref_logps = run.evaluation.score(SequenceScorer(ref, chunk), run.train_pairs)
        diffs = torch.cat([ref_logps.chosen - policy.chosen, ref_logps.rejected - policy.rejected])
        return diffs.mean().item()

    def generation_eval(self, policy: torch.nn.Module) -> dict | None:
        if self.evaluator is None:
            return None
        with eval_mode(policy):
            return self.evaluator.evaluate(policy, lambda: nullcontext(self.base()))

    def iteration(self, t: int, steps_before: int) -> dict:
        ac, out = self.ac, self.iteration_dir(t)
        if self.main:
            out.mkdir(parents=True, exist_ok=True)
        log.info("apo iteration %d/%d from %s", t + 1, ac.iterations, self.start_model(t))

        t0 = time.perf_counter()
        stats = self.sample_pairs(t)
        t_gen = time.perf_counter() - t0

        t0 = time.perf_counter()
        run = TrainingRun(self.inner_config(t, out / "pairs" / "train.jsonl"))
        result = run.run()
        t_train = time.perf_counter() - t0
        if self.main:  # the others wait: the KL estimate, the evaluation and the extrapolation use whole weights
            self.finish_iteration(t, run, result, stats, {"time/generation_seconds": t_gen,
                                                          "time/training_seconds": t_train}, steps_before)
        del run
        gc.collect()
        self.processes.wait_for_everyone()
        return json.loads((out / "done.json").read_text())

    def finish_iteration(self, t: int, run: TrainingRun, result: RunResult, stats: dict, times: dict,
                         steps_before: int) -> None:
        """KL to θ_t, ``policy/``, the generation eval, ``extrapolated/``, ``done.json`` (main process)."""
        ac, out = self.ac, self.iteration_dir(t)
        last = t == ac.iterations - 1
        t0 = time.perf_counter()
        kl_prev = self.kl_to_prev(run)
        merged = run.final_policy.merged_model()
        hat = dense_state(merged)
        save_model_atomically(merged, self.tokenizer, out / "policy")
        evaluation = self.generation_eval(run.final_policy.policy_module())
        t_eval = time.perf_counter() - t0

        extrap_norm, evaluation_x = 0.0, None
        if ac.alpha > 0 and (not last or ac.return_extrapolated):
            anchor = self.base() if t == 0 else load_model(str(self.iteration_dir(t - 1) / "policy"))  # θ̂_t
            prev = dense_state(anchor)
            theta = extrapolate(hat, prev, ac.alpha)
            extrap_norm = torch.sqrt(sum(((theta[k] - hat[k]) ** 2).sum() for k in hat)).item()
            del prev, anchor
            # (for full fine-tuning ``merged`` is the trained policy itself: θ̂ is saved and evaluated above)
            unexpected = merged.load_state_dict(theta, strict=False).unexpected_keys
            assert not unexpected, f"extrapolated tensors the model does not hold: {unexpected[:3]}"
            save_model_atomically(merged, self.tokenizer, out / "extrapolated")
            if ac.eval_extrapolated:
                evaluation_x = self.generation_eval(merged)

        steps = steps_before + result.steps
        record = {"step": steps, "apo/iteration": t + 1, "apo/alpha": ac.alpha,
                  "apo/beta": run.objective.kl_strength(),
                  "apo/pairs_kept": stats["pairs"], "apo/prompts": stats["prompts"],
                  "apo/score_mean": stats["score_all_samples"]["mean"],
                  "apo/score_best": stats["score_chosen"]["mean"], "apo/score_worst": stats["score_rejected"]["mean"],
                  "apo/score_gap": stats["score_gap"]["mean"], "apo/extrap_norm": extrap_norm,
                  "apo/kl_to_prev": kl_prev, "apo/train_steps": result.steps,
                  **times, "time/eval_seconds": t_eval}
        if result.after:
            record.update({f"eval/{k}": v for k, v in result.after.items()})
        for tag, ev in (("gold", evaluation), ("gold_extrapolated", evaluation_x)):
            if ev is not None:
                record.update({f"{tag}/{k.split('/', 1)[1]}": v for k, v in ev.items() if k.startswith("gold/")})
        if evaluation is not None:
            write_json(out / "eval.json", {"policy": evaluation, "extrapolated": evaluation_x})
        write_json(out / "done.json", record)
        log.info("apo iteration %d: %d pairs, sample score %.4f, %s", t + 1, stats["pairs"],
                 record["apo/score_mean"], f"gold reward {record['gold/reward']:.4f}" if evaluation else "")
        del merged, hat

    # -- the run ------------------------------------------------------------------------------------------

    def run(self) -> RunResult:
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            done = [t for t in range(self.ac.iterations) if (self.iteration_dir(t) / "done.json").is_file()]
            # (a config.yaml there means a resumed run, also one stopped inside its first iteration)
            record_config(self.config, self.run_dir, f"iter-{len(done) + 1}")
        self.processes.wait_for_everyone()
        records: list[dict] = []
        for t in range(self.ac.iterations):
            marker = self.iteration_dir(t) / "done.json"
            if marker.is_file():
                records.append(json.loads(marker.read_text()))
                log.info("apo iteration %d already done: skipped", t + 1)
                continue
            records.append(self.iteration(t, records[-1]["step"] if records else 0))
        last = self.iteration_dir(self.ac.iterations - 1)
        if self.main:
            (self.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
            returned = last / ("extrapolated" if self.ac.return_extrapolated and self.ac.alpha > 0 else "policy")
            copy_dir_atomically(returned, self.run_dir / "final")
        first_eval = json.loads((self.iteration_dir(0) / "train" / "eval.json").read_text())
        last_eval = json.loads((last / "train" / "eval.json").read_text())
        generation = json.loads((last / "eval.json").read_text())["policy"] if (last / "eval.json").is_file() else None
        if self.main:
            ac = self.ac
            card_eval = {"before": first_eval.get("before"), "after": last_eval.get("after"),
                         "generation": {generation["task"]: generation} if generation else {}}
            write_final_card(self.run_dir / "final", self.config, card_eval, records[-1]["step"], (
                f"- APO: {ac.iterations} iterations (sample, score, pair, train) of the `{ac.inner}` schedule, "
                f"Nesterov alpha {ac.alpha}; `final/` is iteration {ac.iterations}'s "
                f"{returned.name} model with every adapter merged into the weights; held-out pairs: before "
                "iteration 1 and after the last; generations: the last iteration's policy against the starting "
                "model",))
        self.processes.wait_for_everyone()
        seconds = sum(r["time/training_seconds"] for r in records)
        return RunResult(self.run_dir, records[-1]["step"], seconds, first_eval.get("before"), last_eval.get("after"),
                         generation)


register_schedule("apo", ApoSettings, driver=ApoRun, uses=lambda sections: (sections["apo"].inner,))
