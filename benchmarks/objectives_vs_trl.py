"""Every objective against TRL's own code on the same log-prob tensors: the max |Δ| of the loss and of the
rewards, one markdown row per case (fp64 where TRL runs in fp64). Needs TRL (``pip install -e '.[trl]'``).

    python benchmarks/objectives_vs_trl.py [LLAMA_FACTORY_DPO_TRAINER_PY]

With the path of LLaMA-Factory's ``src/llamafactory/train/dpo/trainer.py`` (a checkout; the package is not
needed), its reference-free ``odds_ratio_loss`` and ``simpo_loss`` are run too (their sigmoid, hinge and ipo are
an older TRL's DPO loss).

The cases and the TRL side are tests/losses/test_against_trl.py's (its assertions are the tolerance; this prints
the numbers).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import torch


def _load_test_module():
    path = Path(__file__).resolve().parents[1] / "tests" / "losses" / "test_against_trl.py"
    spec = importlib.util.spec_from_file_location("test_against_trl", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    import trl

    from preflab.losses import PairLogps, build_objective

    t = _load_test_module()
    print(f"TRL {trl.__version__}, 16 pairs, lengths 2-29 tokens (equal lengths for the NLL objectives)\n")
    print("| TRL | preflab | dtype | max abs Δ loss | max rel Δ loss | max abs Δ rewards |")
    print("|---|---|---|---|---|---|")
    for loss_type, settings, term in t.CASES:
        logps = t._logps()
        if settings.get("f_divergence_type") in t.FLOAT32:
            logps = PairLogps(*(x.float() for x in vars(logps).values()))
        ours = build_objective([term])(logps)
        theirs = t._trl_dpo_losses(logps, loss_type, **settings)
        beta = settings.get("beta", 0.1)
        per_token = term.get("logp_normalize", "mean" if term["name"] == "sigmoid_norm" else "sum") == "mean"
        scale = logps.chosen_tokens if per_token else 1.0
        d_reward = (ours.chosen_rewards * scale - beta * (logps.policy_chosen - logps.ref_chosen)).abs().max()
        shown = ", ".join(f"{k}={float(v) if torch.is_tensor(v) else v}" for k, v in settings.items())
        ours_shown = ", ".join(f"{k}={v}" for k, v in term.items() if k != "name")
        print(f"| `{loss_type}`{' (' + shown + ')' if shown else ''} | `{term['name']}`"
              f"{' (' + ours_shown + ')' if ours_shown else ''} | {str(logps.policy_chosen.dtype)[6:]} | "
              f"{(ours.losses - theirs).abs().max().item():.1e} | "
              f"{((ours.losses - theirs).abs() / theirs.abs().clamp(min=1e-30)).max().item():.1e} | "
              f"{d_reward.item():.1e}"
              f"{' (per token: × length)' if per_token else ''} |")
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    logps = t._logps()
    mean_c, mean_r = logps.policy_chosen / logps.chosen_tokens, logps.policy_rejected / logps.rejected_tokens
    ours = build_objective([{"name": "simpo"}])(logps)
    losses, chosen, _ = CPOTrainer.cpo_loss(t._cpo_trainer("simpo", 2.0, 1.0), mean_c, mean_r)
    print(f"| CPOTrainer `simpo` (beta=2.0, simpo_gamma=1.0) | `simpo` | float64 | "
          f"{(ours.losses - losses).abs().max().item():.1e} | - | "
          f"{(ours.chosen_rewards - chosen).abs().max().item():.1e} |")
    eq = t._logps(equal_lengths=True)
    losses, chosen, _ = CPOTrainer.cpo_loss(t._cpo_trainer("sigmoid", 0.1), eq.policy_chosen, eq.policy_rejected)
    nll = -(eq.policy_chosen.sum() / eq.chosen_tokens.sum())
    full = build_objective([{"name": "cpo"}])(eq)
    print(f"| CPOTrainer `sigmoid` + cpo_alpha 1 (batch mean) | `cpo` | float64 | "
          f"{(full.losses.mean() - losses.mean() - nll).abs().item():.1e} | - | "
          f"{(full.chosen_rewards - chosen).abs().max().item():.1e} |")
    eq32 = PairLogps(*(x.float() for x in vars(eq).values()))
    mean_c, mean_r = eq32.policy_chosen / eq32.chosen_tokens, eq32.policy_rejected / eq32.rejected_tokens
    trainer = SimpleNamespace(beta=0.1, accelerator=SimpleNamespace(device="cpu"))
    losses, chosen, _, _, _ = ORPOTrainer.odds_ratio_loss(trainer, mean_c, mean_r)
    ours = build_objective([{"name": "orpo"}])(eq32)
    nll = -(eq32.policy_chosen.sum() / eq32.chosen_tokens.sum())
    print(f"| ORPOTrainer (beta=0.1; NLL − mean OR term) | `orpo` (lambda_=0.1) | float32 (TRL casts) | "
          f"{(ours.losses.mean() - (nll - losses.mean())).abs().item():.1e} | - | "
          f"{(ours.chosen_rewards - chosen).abs().max().item():.1e} |")
    if len(sys.argv) > 1:
        _llama_factory(Path(sys.argv[1]), t)
    return 0


def _llama_factory(path: Path, t) -> None:
    """LLaMA-Factory's ``orpo`` and ``simpo`` (per-token mean log-probs, as it computes them for these)."""
    import ast
    import textwrap

    import torch.nn.functional as F

    from preflab.losses import build_objective

    source = path.read_text()
    methods = {node.name: ast.get_source_segment(source, node) for node in ast.walk(ast.parse(source))
               if isinstance(node, ast.FunctionDef) and node.name in ("odds_ratio_loss", "simpo_loss")}
    namespace = {"torch": torch, "F": F}
    for text in methods.values():
        exec(textwrap.dedent(text), namespace)
    logps = t._logps()
    mean_c, mean_r = logps.policy_chosen / logps.chosen_tokens, logps.policy_rejected / logps.rejected_tokens
    trainer = SimpleNamespace(beta=0.1, simpo_gamma=0.5)
    theirs = namespace["odds_ratio_loss"](trainer, mean_c, mean_r)
    ours = build_objective([{"name": "orpo", "lambda_": 0.1}])(logps).losses
    print(f"| LLaMA-Factory `orpo` (pref_beta=0.1) | `orpo` (lambda_=0.1) | float64 | "
          f"{(ours - theirs).abs().max().item():.1e} | - | - |")
    trainer = SimpleNamespace(beta=2.0, simpo_gamma=1.0)
    theirs = namespace["simpo_loss"](trainer, mean_c, mean_r)
    ours = build_objective([{"name": "simpo", "beta": 2.0, "gamma": 1.0}])(logps).losses
    print(f"| LLaMA-Factory `simpo` (pref_beta=2.0, simpo_gamma=1.0) | `simpo` | float64 | "
          f"{(ours - theirs).abs().max().item():.1e} | - | - |")


if __name__ == "__main__":
    sys.exit(main())
