"""The ``preflab`` command.

    preflab train [CONFIG.yaml] [key.sub=value ...]   train (resumes from the run directory's last checkpoint)
    preflab export RUN_DIR OUT_DIR                    merge an adapter run into a plain Hugging Face model
    preflab eval TARGET --task TASK [...]             gold reward, win rate, KL, length, diversity of generations
    preflab data build TASK --out DIR [...]           sample, score and pair responses for a gold-reward task
    preflab toy [--scenarios ...] [--out DIR]         the 3D-properties toy model: curves as JSON and PNG
    preflab report RUN_DIR [...] [--out FILE]         a self-contained HTML page comparing runs
    preflab config [CONFIG.yaml] [key=value ...]      print the resolved config without running anything

User errors (config, data, files that cannot be read or written, non-finite loss) end with one clear line and exit
code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _config_args(args: list[str]) -> tuple[str | None, list[str]]:
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def _print_summary(result) -> None:
    from .train.outputs import HELD_OUT_SUMMARY, format_metric

    before, after = result.before or {}, result.after or {}
    skips = result.nonfinite_skips
    skipped = f" ({skips} of them skipped: a non-finite loss or gradient, no update)" if skips else ""
    print(f"\npreflab: trained {result.steps} steps{skipped} in {result.seconds:.0f} s of training time")
    if after:
        print(f"held-out pairs: {after['num_pairs']}")
        for key, label in HELD_OUT_SUMMARY:
            print(f"  {label:40s} {format_metric(before.get(key))} -> {format_metric(after.get(key))}")
    if result.generation:
        from .eval.generation import format_table

        print(format_table(result.generation))
    if result.table:
        print(result.table)
    print(f"run directory: {result.run_dir} (final model in {result.run_dir / 'final'})")


def cmd_train(args: argparse.Namespace) -> None:
    from .config import ConfigError, load_config
    from .train import train

    if not args.args and not args.defaults:  # a typo'd command line must not start an hour-long default run
        raise ConfigError("train: give a config file (for example configs/dpo.yaml) and/or key=value "
                          "overrides; --defaults trains the built-in defaults (LoRA DPO on the built-in model)")
    path, overrides = _config_args(args.args)
    if path is not None and args.defaults:
        raise ConfigError(f"train: --defaults and the config file {path}: give one of them")
    config = load_config(path, overrides)
    try:
        result = train(config)
    except BaseException:
        _leave_process_group(wait=False)
        raise
    _leave_process_group(wait=True)
    if int(os.environ.get("RANK", "0")) == 0:  # under DDP, the main process speaks for all
        _print_summary(result)


def _leave_process_group(wait: bool) -> None:
    """Under several processes, every one waits for the others (the main one may still be writing ``final/``) and
    they leave the process group together: a process that exits while the others still talk to it over gloo can
    abort (``terminate called without an active exception``). After an error (``wait`` false) nobody waits."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if wait:
        dist.barrier()
    dist.destroy_process_group()


def cmd_config(args: argparse.Namespace) -> None:
    import yaml

    from .adapters.base import check_parametrization
    from .config import changes_from_defaults, load_config

    path, overrides = _config_args(args.args)
    config = load_config(path, overrides)
    check_parametrization(config.model.name, config.parametrization)  # the settings against the model's layers
    if args.changed:
        print("\n".join(changes_from_defaults(config)) or "(every setting is the default)")
    else:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")


def cmd_export(args: argparse.Namespace) -> None:
    from .export import export_run

    print(f"exported to {export_run(args.run_dir, args.out_dir, args.dtype, args.overwrite)}")


def cmd_eval(args: argparse.Namespace) -> None:
    from .eval.generation import format_table
    from .eval.target import eval_config, evaluate_target

    cfg = eval_config(args.task, num_prompts=args.num_prompts, max_new_tokens=args.max_new_tokens,
                      greedy=args.greedy or None, seed=args.seed)
    result, path = evaluate_target(args.target, cfg, reference=args.reference, out=args.out)
    print(format_table(result))
    if "preference" in result:
        p = result["preference"]
        print(f"  held-out pairs: {p['num_pairs']}, preference accuracy {p['rewards/accuracies']:.4f}, "
              f"likelihood preference per token {p['pref/logp_accuracy_per_token']:.4f}")
    print(f"written to {path}")


def cmd_toy(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from .config import ConfigError
    from .toy import SCENARIOS, VARIANTS, plot_study, run_study

    scenarios = list(SCENARIOS) if args.scenarios == ["all"] else args.scenarios
    for name in scenarios:
        if name not in SCENARIOS:
            raise ConfigError(f"toy: unknown scenario {name!r}; expected one of {sorted(SCENARIOS)} or all")
    variants = VARIANTS if args.variants == ["all"] else {v: VARIANTS[v] for v in args.variants if v in VARIANTS}
    if len(variants) != (len(VARIANTS) if args.variants == ["all"] else len(args.variants)):
        raise ConfigError(f"toy: unknown variant in {args.variants}; expected some of {sorted(VARIANTS)} or all")
    study = run_study(scenarios, variants, seed=args.seed, epochs=args.epochs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "toy.json").write_text(json.dumps(study) + "\n")
    plot_study(study, out / "toy.png")
    print(f"{'scenario':24s} {'variant':8s} {'chosen start/peak/final':>26s} {'rejected final':>15s} "
          f"{'unseen min/final':>17s} {'log10 grad gap':>15s}")
    for scenario, results in study.items():
        for name, result in results.items():
            s = result["summary"]
            print(f"{scenario:24s} {name:8s} {s['chosen_start']:8.3f} {s['chosen_peak']:8.3f} {s['chosen_final']:8.3f} "
                  f"{s['rejected_final_max']:15.1e} {s['unseen_mass_min']:8.3f} {s['unseen_mass_final']:8.3f} "
                  f"{s['log10_grad_gap_final']:15.1f}")
    print(f"curves: {out / 'toy.json'}, plot: {out / 'toy.png'}")


def cmd_report(args: argparse.Namespace) -> None:
    from .report import write_report

    print(f"report: {write_report(args.run_dirs, args.out)}")


def cmd_data_build(args: argparse.Namespace) -> None:
    import json

    from .data.build import BuildConfig, build_pairs, write_data_card
    from .models.generate import SamplingConfig

    cfg = BuildConfig(task=args.task, split=args.split, model=args.model, num_prompts=args.num_prompts, k=args.k,
                      min_gap=args.min_gap, batch_prompts=args.batch_prompts, seed=args.seed,
                      sampling=SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                              top_p=args.top_p))
    print(json.dumps(build_pairs(cfg, args.out), indent=2))
    print(f"data card: {write_data_card(args.out, args.task)}")


_KEYS_EPILOG = """\
keys: every setting is a dotted key of the YAML tree, e.g. train.lr=1e-4 loss.beta=0.2 parametrization.kind=ropo.
  preflab config CONFIG [key=value ...]   prints every key the run reads, with its value (defaults filled in)
  README.md, "A short tour"               what each section and key means (Config, Data, Resume, ...)
  a wrong key is refused before any work, with the close matches

examples:
  preflab train configs/dpo.yaml
  preflab train configs/dpo.yaml train.lr=1e-4 output_dir=runs/try
  preflab train configs/dpo.yaml parametrization.kind=ropo   (the other kind's settings are dropped, with a note)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="preflab", description="Preference optimization of language models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a policy from a YAML config plus key.sub=value overrides",
                       epilog=_KEYS_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("args", nargs="*", metavar="CONFIG|key=value")
    p.add_argument("--defaults", action="store_true", help="with no CONFIG: train the built-in defaults")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("config", help="print the resolved config (validation only)", epilog=_KEYS_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("args", nargs="*", metavar="CONFIG|key=value")
    p.add_argument("--changed", action="store_true",
                   help="print only what differs from the defaults (of the same schedule and components), "
                        "as key: default -> value")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("export", help="write a run's final model as a plain Hugging Face model")
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT_DIR (an earlier export)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("eval", help="judge a run or model by its generations on a task's held-out prompts")
    p.add_argument("target", help="a run directory or a model name")
    p.add_argument("--task", required=True)
    p.add_argument("--reference", default=None, help="reference model (default: the run's base / built-in)")
    p.add_argument("--num-prompts", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", default=None, help="output JSON (default: the run's eval.json)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("toy", help="the 3D-properties toy model: DPO and regularizers on 4 prompts x 10 responses")
    p.add_argument("--out", default="runs/toy")
    p.add_argument("--scenarios", nargs="+", default=["both_on", "both_off"],
                   help="SFT starts (on-policy both_on, off-policy both_off, ...), or all")
    p.add_argument("--variants", nargs="+", default=["all"], help="dpo, flex, sft_dpo, dpop, or all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=2000)
    p.set_defaults(func=cmd_toy)

    p = sub.add_parser("report", help="one HTML page with the curves of one or several runs")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out", default="report.html")
    p.set_defaults(func=cmd_report)

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("build", help="sample k responses per prompt, score them, keep best-vs-worst pairs")
    p.add_argument("task")
    p.add_argument("--out", required=True, help="output directory (resumes a build found there)")
    p.add_argument("--split", default="train", choices=["train", "eval"])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--num-prompts", type=int, default=None)
    p.add_argument("-k", type=int, default=4, help="samples per prompt")
    p.add_argument("--min-gap", type=float, default=0.5, help="minimum gold-score gap of a kept pair")
    p.add_argument("--batch-prompts", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.set_defaults(func=cmd_data_build)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError
    from .console import setup_logging
    from .data.dataset import DataError
    from .data.sources import DataSourceError
    from .export import ExportError
    from .models.loader import ModelNotFoundError
    from .train import TrainingError
    from .train.checkpoint import CheckpointError
    from .train.safety import TrainingInterrupted

    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notices, not user problems
    setup_logging(logging.DEBUG if args.verbose else logging.INFO, cli=True)
    try:
        args.func(args)
    except TrainingInterrupted as e:
        print(f"preflab: {e}", file=sys.stderr)
        return e.exit_code
    except (ConfigError, DataError, DataSourceError, ExportError, ModelNotFoundError, TrainingError,
            CheckpointError, OSError) as e:  # OSError: a file that cannot be read or written (missing, disk full)
        print(f"preflab: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
