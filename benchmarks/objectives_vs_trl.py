"""Every objective against TRL's own code on the same log-prob tensors: the max |Δ| of the loss and of the
rewards, one markdown row per case (fp64 where TRL runs in fp64). Needs TRL (``pip install -e '.[trl]'``).

    python benchmarks/objectives_vs_trl.py [--llama-factory TRAINER_PY] [--old-trl-dpo DPO_TRAINER_PY]
                                           [--trl-bco BCO_TRAINER_PY]

Source files of other versions (checkouts; their packages are not needed), each adding rows:
- ``--llama-factory``: LLaMA-Factory's ``src/llamafactory/train/dpo/trainer.py``: its reference-free
  ``odds_ratio_loss`` and ``simpo_loss`` (its sigmoid, hinge, ipo and kto_pair are an older TRL's DPO loss);
- ``--old-trl-dpo``: ``trl/trainer/dpo_trainer.py`` of TRL ≤ 0.9 (e.g. commit 12f99b9e1~1, 0.9.5.dev0), whose
  ``kto_pair`` branch is LLaMA-Factory's ``kto_pair``;
- ``--trl-bco``: ``trl/experimental/bco/bco_trainer.py`` of TRL's main branch: its ``RunningMoments`` and
  ``bco_loss`` over three training steps against ``bco_pair``'s running δ.

TRL 1.16's ``ld_alpha`` block is always run (LD-DPO on per-token log-probs, against
``PairLogps.length_desensitized`` on the same tokens' sums).

The cases and the TRL side are tests/losses/test_against_trl.py's (its assertions are the tolerance; this prints
the numbers).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import inspect
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import torch


def _load_test_module():
    path = Path(__file__).resolve().parents[1] / "tests" / "losses" / "test_against_trl.py"
    spec = importlib.util.spec_from_file_location("test_against_trl", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(args: argparse.Namespace) -> int:
    import trl

    from preflab.losses import build_objective

    t = _load_test_module()
    print(f"TRL {trl.__version__}, 16 pairs, lengths 2-29 tokens (equal lengths for the NLL objectives)\n")
    print("| TRL | preflab | dtype | max abs Δ loss | max rel Δ loss | max abs Δ rewards |")
    print("|---|---|---|---|---|---|")
    for loss_type, settings, term in t.CASES:
        logps = t._logps()
        if settings.get("f_divergence_type") in t.FLOAT32:
            logps = t._float32(logps)
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
    eq = t._logps(equal_lengths=True)
    sft = build_objective([{"name": "sft"}])(eq).losses.mean() - t._trl_dpo_losses(eq, "sft").mean()
    _row("`sft` (equal lengths; batch mean)", "`sft`", "float64", sft.abs().item())
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
    eq32 = t._float32(eq)
    mean_c, mean_r = eq32.policy_chosen / eq32.chosen_tokens, eq32.policy_rejected / eq32.rejected_tokens
    trainer = SimpleNamespace(beta=0.1, accelerator=SimpleNamespace(device="cpu"))
    losses, chosen, _, _, _ = ORPOTrainer.odds_ratio_loss(trainer, mean_c, mean_r)
    ours = build_objective([{"name": "orpo"}])(eq32)
    nll = -(eq32.policy_chosen.sum() / eq32.chosen_tokens.sum())
    print(f"| ORPOTrainer (beta=0.1; NLL − mean OR term) | `orpo` (lambda_=0.1) | float32 (TRL casts) | "
          f"{(ours.losses.mean() - (nll - losses.mean())).abs().item():.1e} | - | "
          f"{(ours.chosen_rewards - chosen).abs().max().item():.1e} |")
    _ld_alpha(t)
    if args.llama_factory:
        _llama_factory(args.llama_factory, t)
    if args.old_trl_dpo:
        _old_trl_kto_pair(args.old_trl_dpo, t)
    if args.trl_bco:
        _trl_bco_running(args.trl_bco, t)
    return 0


def _row(peer: str, ours: str, dtype: str, d_loss: float, d_other: str = "-") -> None:
    print(f"| {peer} | {ours} | {dtype} | {d_loss:.1e} | - | {d_other} |")


def _ld_alpha(t) -> None:
    """TRL 1.16's ``ld_alpha`` aggregation of per-token log-probs, then its sigmoid loss, against preflab's shared
    and total sums through ``length_desensitized`` (each layout's shared sums: tests/models/test_shared_length.py)."""
    from trl import DPOTrainer

    from preflab.losses import PairLogps, build_objective

    g, n = torch.Generator().manual_seed(0), 16
    lengths = torch.randint(2, 30, (2 * n,), generator=g)
    width = int(lengths.max())
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    policy = -torch.rand(2 * n, width, generator=g, dtype=torch.float64) * 2.5 * mask
    ref = -torch.rand(2 * n, width, generator=g, dtype=torch.float64) * 2.5 * mask
    source = inspect.getsource(DPOTrainer._compute_loss)
    block = textwrap.dedent(source[source.index("        if self.ld_alpha is None:"):
                                   source.index("        chosen_logps, rejected_logps = logps.chunk(2, dim=0)")])
    shared_len = torch.minimum(lengths[:n], lengths[n:]).repeat(2)
    first = (torch.arange(width)[None, :] < shared_len[:, None]).to(torch.float64)
    for alpha in (0.0, 0.5, 1.0):
        trl_logps = []
        for per_token in (policy, ref):
            namespace = {"self": type("T", (), {"ld_alpha": alpha})(), "torch": torch, "device": "cpu",
                         "per_token_logps": per_token, "shift_completion_mask": mask}
            exec(compile(block, "trl DPOTrainer._compute_loss", "exec"), namespace)
            trl_logps.append(namespace["logps"])
        counts = lengths.to(torch.float64)
        scores = [(p.sum(1), (p * first).sum(1)) for p in (policy, ref)]
        pairs = PairLogps.of_batch(n, (scores[0][0], counts, scores[0][1]), scores[1])
        ours = pairs.length_desensitized(alpha)
        theirs = PairLogps.of_batch(n, (trl_logps[0], counts, None), (trl_logps[1], None))
        d_logps = (torch.cat([ours.policy_chosen, ours.policy_rejected, ours.ref_chosen, ours.ref_rejected])
                   - torch.cat([theirs.policy_chosen, theirs.policy_rejected, theirs.ref_chosen,
                                theirs.ref_rejected])).abs().max().item()
        loss_ours = build_objective([{"name": "sigmoid", "ld_alpha": alpha}])(pairs).losses
        loss_theirs = t._trl_dpo_losses(theirs, "sigmoid")
        _row(f"`ld_alpha`={alpha} (+ `sigmoid`)", f"`ld_alpha: {alpha}`", "float64",
             (loss_ours - loss_theirs).abs().max().item(), f"{d_logps:.1e} (log-probs)")


def _llama_factory(path: Path, t) -> None:
    """LLaMA-Factory's ``orpo`` and ``simpo`` (per-token mean log-probs, as it computes them for these)."""
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


def _old_trl_kto_pair(path: Path, t) -> None:
    """TRL ≤ 0.9's ``kto_pair`` branch of ``DPOTrainer.dpo_loss`` (LLaMA-Factory's ``kto_pair``): its losses are the
    2B concatenated halves, preflab's the per-pair means of them; its reference points pass gradients
    (``detach_kl: false``)."""
    import torch.nn.functional as F

    from preflab.losses import build_objective

    source = path.read_text()
    start = source.index('        elif self.loss_type == "kto_pair":')
    end = source.index('        elif self.loss_type == "bco_pair":')
    block = "if True:\n" + textwrap.dedent(source[start:end]).split("\n", 1)[1]
    for detach in (True, False):
        logps = t._logps()
        leaves = [x.clone().requires_grad_(True) for x in (logps.policy_chosen, logps.policy_rejected)]
        namespace = {"self": SimpleNamespace(beta=0.1), "torch": torch, "F": F, "policy_chosen_logps": leaves[0],
                     "policy_rejected_logps": leaves[1], "reference_chosen_logps": logps.ref_chosen,
                     "reference_rejected_logps": logps.ref_rejected}
        exec(compile(block, "trl 0.9 DPOTrainer.dpo_loss", "exec"), namespace)
        theirs = namespace["losses"]
        theirs.mean().backward()
        trl_grads = [x.grad for x in leaves]
        mine = [x.clone().requires_grad_(True) for x in (logps.policy_chosen, logps.policy_rejected)]
        pair = type(logps)(mine[0], mine[1], *list(vars(logps).values())[2:])
        ours = build_objective([{"name": "kto_pair", "detach_kl": detach}])(pair)
        ours.losses.mean().backward()
        n = len(mine[0])
        d_loss = (ours.losses - (theirs[:n] + theirs[n:]) / 2).abs().max().item()
        d_grad = max((a.grad - b).abs().max().item() for a, b in zip(mine, trl_grads))
        _row("TRL 0.9 / LLaMA-Factory `kto_pair`", f"`kto_pair` (detach_kl={str(detach).lower()})", "float64",
             d_loss, f"{d_grad:.1e} (gradient)")


def _trl_bco_running(path: Path, t) -> None:
    """TRL's ``BCOTrainer``: ``RunningMoments.update`` on each training step's rewards, then ``bco_loss`` with the
    updated mean, over three steps of different batches; against ``Objective.observe`` then the call."""
    import dataclasses
    import math

    import torch.nn.functional as F

    from preflab.losses import build_objective

    source = path.read_text()
    tree = ast.parse(source)
    moments = next(ast.get_source_segment(source, node) for node in ast.walk(tree)
                   if isinstance(node, ast.ClassDef) and node.name == "RunningMoments")
    namespace = {"torch": torch, "Accelerator": object, "math": math}
    exec(compile(moments, "trl RunningMoments", "exec"), namespace)  # (the segment leaves out its @dataclass)
    running = dataclasses.dataclass(namespace["RunningMoments"])(SimpleNamespace(use_distributed=False))
    objective = build_objective([{"name": "bco_pair"}])
    d_loss = d_delta = 0.0
    for step in range(3):
        logps = t._logps(seed=step + 1)
        chosen = 0.1 * (logps.policy_chosen - logps.ref_chosen)
        rejected = 0.1 * (logps.policy_rejected - logps.ref_rejected)
        running.update(torch.cat((chosen, rejected), 0).detach())
        delta = torch.as_tensor(running.mean, dtype=torch.float64)
        theirs = -F.logsigmoid(chosen - delta) - F.logsigmoid(-(rejected - delta))  # its chosen + rejected halves
        objective.observe([logps])
        ours = objective(logps)
        d_loss = max(d_loss, (ours.losses - theirs).abs().max().item())
        d_delta = max(d_delta, abs(ours.metrics["delta"][0].item() - running.mean))
    _row("TRL `BCOTrainer` (RunningMoments δ, 3 steps)", "`bco_pair` (reward_shift null)", "float64 (TRL's δ: float32)",
         d_loss, f"{d_delta:.1e} (δ)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llama-factory", type=Path)
    parser.add_argument("--old-trl-dpo", type=Path)
    parser.add_argument("--trl-bco", type=Path)
    sys.exit(main(parser.parse_args()))
