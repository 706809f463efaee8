"""The 3D-properties diagnostics of DPO (Yan et al., arXiv 2406.07327), measured during every run.

On fixed sets, every ``diag.probe_every`` steps, with a policy forward only (reference log-probs are
computed once, before training):

- ``3d/seen_chosen``, ``3d/seen_rejected``: mean ρ± = logp_θ − logp_ref on a fixed, seeded subset of the
  training pairs (steadier than batch values);
- ``3d/probe_logratio`` (and ``_per_token``, ``_std``): mean logp_θ − logp_ref over responses never trained
  on (the dispersion probe). ``reference_samples`` (default): responses sampled once from the reference
  on held-out prompts, stored in ``probe.jsonl`` of the run directory; ``cross_prompt``: pair j's chosen
  response under pair i's prompt (i ≠ j), where the toy model's freed mass goes.
- flags ``3d/p1``, ``3d/p2``, ``3d/p3`` over the last ``diag.window`` probes:
  P1 (drastic drop): seen_rejected fell by more than seen_chosen rose, and the log gradient ratio grew;
  P2 (degradation): seen_chosen fell at every probe of the window, below its running maximum, while
  seen_rejected still fell; P3 (dispersion): seen_chosen < 0 and seen_rejected < 0.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from torch import nn

from ..config import DiagConfig
from ..console import progress
from ..data.tokenize import TokenizedPair
from ..models.generate import SamplingConfig, generate
from ..models.scorer import eval_mode
from .scoring import Rows, score_sequences


class ThreeDProbe:
    """Fixed seen pairs and probe responses, their reference log-probs, and the metrics of a policy."""

    def __init__(self, cfg: DiagConfig, train_pairs: list[TokenizedPair], heldout_prompts: list[tuple[int, ...]],
                 seed: int, pad_id: int, batch_size: int):
        self.cfg, self.pad_id, self.batch_size, self.seed = cfg, pad_id, batch_size, seed
        rng = random.Random(f"3d-seen-{seed}")
        seen = rng.sample(train_pairs, min(cfg.seen_pairs, len(train_pairs)))
        self.seen_rows: Rows = [(p.prompt_ids, p.chosen_ids) for p in seen] + [(p.prompt_ids, p.rejected_ids)
                                                                              for p in seen]
        self.heldout_prompts = heldout_prompts
        self.probe_rows: Rows = []
        if cfg.probe_kind == "cross_prompt" and len(seen) > 1:
            self.probe_rows = [(seen[i].prompt_ids, seen[(i + 1) % len(seen)].chosen_ids) for i in range(len(seen))]
        self._ref: tuple[torch.Tensor, torch.Tensor] | None = None
        self.history: list[dict] = []

    @property
    def samples(self) -> bool:
        """Its probe responses are sampled from the reference (``sample`` before ``prepare``)."""
        return self.cfg.probe_kind == "reference_samples" and bool(self.heldout_prompts)

    def sample(self, reference: Callable[[], AbstractContextManager[nn.Module]] | None, tokenizer,
               cache: Path | None) -> Rows:
        """The probe responses: read from ``cache`` where it is stored, else sampled from the whole-weight
        ``reference`` (and stored there)."""
        if cache is not None and cache.is_file():
            return [(tuple(r["prompt_ids"]), tuple(r["response_ids"])) for r in map(json.loads, cache.open())]
        cfg = self.cfg
        prompts = self.heldout_prompts[: cfg.probe_prompts]
        sampling = SamplingConfig(max_new_tokens=cfg.probe_max_new_tokens, temperature=cfg.probe_temperature)
        rows: Rows = []
        starts = range(0, len(prompts), self.batch_size)
        with reference() as ref, eval_mode(ref):
            for b, start in enumerate(progress(starts, desc="3D probe: sampling from the reference",
                                               unit="batches")):
                groups = generate(ref, tokenizer, prompts[start:start + self.batch_size], cfg.probe_samples,
                                  sampling, seed=self.seed * 1_000_003 + b)
                rows += [(g.prompt_ids, g.response_ids) for group in groups for g in group if g.response_ids]
        if cache is not None:
            tmp = cache.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps({"prompt_ids": list(p), "response_ids": list(r)}) + "\n"
                                   for p, r in rows))
            tmp.replace(cache)
        return rows

    def plan(self, cache: Path | None) -> str:
        """What :meth:`prepare` will do, in words (logged before it starts: sampling can take minutes)."""
        cfg, n_seen = self.cfg, len(self.seen_rows) // 2
        what = f"scoring {n_seen} seen pairs"
        if cfg.probe_kind == "reference_samples" and self.heldout_prompts:
            n = min(cfg.probe_prompts, len(self.heldout_prompts))
            if cache is not None and cache.is_file():
                what += f" and the probe responses stored in {cache}"
            else:
                what += (f", sampling {n * cfg.probe_samples} probe responses ({n} held-out prompts x "
                         f"{cfg.probe_samples}, up to {cfg.probe_max_new_tokens} new tokens) and scoring them")
        elif self.probe_rows:
            what += f" and {len(self.probe_rows)} cross-prompt probe responses"
        return (f"3D diagnostics: {what} under the reference, once before the first step (diag.probe_prompts, "
                f"diag.probe_max_new_tokens and diag.seen_pairs size it; diag.enabled=false skips it)")

    def prepare(self, reference_scorer: AbstractContextManager[nn.Module], device,
                probe_rows: Rows | None = None) -> None:
        """Score the seen pairs and the probe responses (``probe_rows``, from :meth:`sample`, where it samples)
        under the reference (``reference_scorer``: a context that yields a sequence scorer)."""
        if probe_rows is not None:
            self.probe_rows = probe_rows
        with reference_scorer as ref, eval_mode(ref):
            self._ref = self._score(ref, device)

    def _score(self, scorer: nn.Module, device) -> tuple[torch.Tensor, torch.Tensor]:
        return score_sequences(scorer, self.seen_rows + self.probe_rows, self.pad_id, self.batch_size, device)

    def measure(self, policy_scorer: nn.Module, device, log_grad_ratio: float | None = None) -> dict[str, float]:
        """The ``3d/`` metrics of the policy now; appends to the history the flags read."""
        if self._ref is None:
            raise RuntimeError("ThreeDProbe.prepare() must run before measure()")
        logps, counts = self._score(policy_scorer, device)
        rho = logps - self._ref[0]
        n_seen = len(self.seen_rows) // 2
        out = {"3d/seen_chosen": rho[:n_seen].mean().item(), "3d/seen_rejected": rho[n_seen:2 * n_seen].mean().item()}
        if self.probe_rows:
            probe, probe_counts = rho[2 * n_seen:], counts[2 * n_seen:]
            out["3d/probe_logratio"] = probe.mean().item()
            out["3d/probe_logratio_per_token"] = (probe / probe_counts).mean().item()
            out["3d/probe_logratio_std"] = probe.std().item() if len(probe) > 1 else 0.0
        self.history.append({**out, "log_grad_ratio": log_grad_ratio})
        out.update(self.flags())
        return out

    def flags(self) -> dict[str, float]:
        w = self.cfg.window
        recent = self.history[-(w + 1):]
        last = self.history[-1]
        flags = {"3d/p3": float(last["3d/seen_chosen"] < 0 and last["3d/seen_rejected"] < 0)}
        if len(recent) < w + 1:
            return {"3d/p1": 0.0, "3d/p2": 0.0, **flags}
        d_chosen = recent[-1]["3d/seen_chosen"] - recent[0]["3d/seen_chosen"]
        d_rejected = recent[-1]["3d/seen_rejected"] - recent[0]["3d/seen_rejected"]
        grads = [h["log_grad_ratio"] for h in (recent[0], recent[-1])]
        grad_grew = None in grads or grads[1] > grads[0]
        # rejected fell (−Δ⁻ > 0) by more than chosen rose
        flags["3d/p1"] = float(-d_rejected > max(d_chosen, 0.0) and grad_grew)
        # falling at every probe of the window (so the last one lies below the running maximum)
        falling = all(b["3d/seen_chosen"] < a["3d/seen_chosen"] for a, b in zip(recent, recent[1:]))
        flags["3d/p2"] = float(falling and d_rejected < 0)
        return flags
