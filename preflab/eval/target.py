"""``preflab eval TARGET --task TASK``: evaluate a run directory or any model against a reference.

- A run directory: the policy is ``final/`` (an adapter on the run's base model, whose reference is the
  base with the adapter disabled; or a full model, whose reference is the run's starting model).
- Any other model name: the policy is that model; the reference is ``--reference`` (default: the built-in
  model).

Writes the result into the run's ``eval.json`` under ``generation.TASK`` (or to ``--out``) and returns it.
Held-out preference accuracy is added when the task ships eval pairs (``builtin:TASK``).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from ..config import ConfigError, GenerationEvalConfig
from ..data.dataset import load_pairs
from ..data.sources import BUILTIN_ROOT
from ..data.tokenize import PairTokenizer
from ..losses import build_objective
from ..models.loader import DEFAULT_MODEL, load_model, load_tokenizer, run_model_name
from ..models.scorer import SequenceScorer
from .generation import GenerationEvaluator
from .preference import preference_metrics, score_pairs


def _policy_and_reference(target: str, reference_name: str | None):
    run_dir = Path(target)
    base_name = run_model_name(run_dir) if (run_dir / "final").is_dir() else None
    if base_name is not None:
        final = run_dir / "final"
        if (final / "adapter_config.json").is_file() and reference_name is None:
            from peft import PeftModel

            policy = PeftModel.from_pretrained(load_model(base_name), final)

            @contextmanager
            def adapter_off():
                with policy.disable_adapter():
                    yield policy

            return policy, adapter_off, str(final), run_dir
        policy = load_model(str(final))
        reference_name = reference_name or base_name
    else:
        policy, run_dir = load_model(target), None
        reference_name = reference_name or DEFAULT_MODEL
    frozen = load_model(reference_name).eval()

    @contextmanager
    def separate():
        yield frozen

    return policy, separate, target, run_dir


def evaluate_target(target: str, cfg: GenerationEvalConfig, reference: str | None = None,
                    out: str | None = None) -> tuple[dict, Path]:
    policy, reference_ctx, tokenizer_source, run_dir = _policy_and_reference(target, reference)
    tokenizer = load_tokenizer(tokenizer_source)
    result = GenerationEvaluator(tokenizer, cfg).evaluate(policy, reference_ctx)
    if (BUILTIN_ROOT / cfg.task / "eval.jsonl").is_file():
        pairs, _ = load_pairs(f"builtin:{cfg.task}", "eval", PairTokenizer(tokenizer))
        with reference_ctx() as ref:
            ref_logps = score_pairs(SequenceScorer(ref.eval()), pairs, cfg.batch_size, tokenizer.pad_token_id)
        pol_logps = score_pairs(SequenceScorer(policy.eval()), pairs, cfg.batch_size, tokenizer.pad_token_id)
        result["preference"] = preference_metrics(build_objective([{"name": "sigmoid"}]), pol_logps, ref_logps)
    if out is not None:
        path = Path(out)
        path.write_text(json.dumps(result, indent=2) + "\n")
    elif run_dir is not None:
        path = run_dir / "eval.json"
        record = json.loads(path.read_text()) if path.is_file() else {}
        record.setdefault("generation", {})[cfg.task] = result
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(path)
    else:
        path = Path(f"eval-{cfg.task}.json")
        path.write_text(json.dumps(result, indent=2) + "\n")
    return result, path


def eval_config(task: str, **overrides) -> GenerationEvalConfig:
    """The evaluation settings for a task, with the options a user gave (None: the default)."""
    try:
        return replace(GenerationEvalConfig(task=task), **{k: v for k, v in overrides.items() if v is not None})
    except ValueError as e:
        raise ConfigError(f"eval.{e}") from None
