"""The cost of an OFS-DPO step (two LoRA modules) against one DPO step, on the same batch.

    python benchmarks/bench_ofs_step.py --pairs 8 --steps 5

All runs use preflab's scorer (shared layout, chunked log-probs) on the built-in model's sentiment pairs:

- ``dpo_peft``: one DPO step with a PEFT LoRA adapter (what ``preflab train configs/dpo.yaml`` runs);
- ``dpo_pair``: the same with one module of the fast/slow pair (the pair's own layers, the slow one idle);
- ``ofs_fused``: both modules in one routed forward on the duplicated batch, each module's DPO loss plus the
  chasing term, one backward, two AdamW steps;
- ``ofs_separate``: the same with two forwards (one per module).

Each step includes the reference forward (the base with the modules off) unless ``--cached-reference``, which
measures the steps a reference cache leaves. Prints one JSON line per run with the median step (after the
warm-up) and its ratio to ``dpo_peft``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import torch.nn.functional as F

from preflab.adapters import build_parametrization
from preflab.adapters.lora import LoraParams
from preflab.data.collate import collate_pairs
from preflab.data.dataset import load_pairs
from preflab.data.tokenize import PairTokenizer
from preflab.models.loader import DEFAULT_MODEL, load_model, load_tokenizer
from preflab.models.scorer import SequenceScorer
from preflab.ofs.chasing import chasing_term
from preflab.ofs.pair import FastSlowLora, duplicate_rows

BETA, ALPHA = 0.1, 0.1


def _margins(logps, ref, b):
    return BETA * ((logps[:b] - ref[:b]) - (logps[b:2 * b] - ref[b:2 * b]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--cached-reference", action="store_true")
    a = p.parse_args()

    tokenizer = load_tokenizer(DEFAULT_MODEL)
    pairs, _ = load_pairs("builtin:sentiment", "train", PairTokenizer(tokenizer), limit=a.pairs)
    batch = collate_pairs(pairs, tokenizer.pad_token_id, "shared")
    b = batch.num_pairs
    base = load_model(DEFAULT_MODEL)

    peft = build_parametrization("lora", LoraParams(r=a.r, alpha=2.0 * a.r), copy.deepcopy(base))
    pair = FastSlowLora(copy.deepcopy(base), r=a.r, alpha=2.0 * a.r)
    peft.model.train()
    pair.model.train()
    opt_peft = torch.optim.AdamW([q for q in peft.model.parameters() if q.requires_grad], lr=1e-4)
    opts = {m: torch.optim.AdamW(pair.parameters(m), lr=1e-4 * (1 if m == "fast" else 0.1)) for m in ("fast", "slow")}
    cached = {}

    def reference(kind):
        if a.cached_reference and kind in cached:
            return cached[kind]
        with torch.no_grad():
            if kind == "peft":
                with peft.reference() as ref:
                    out = SequenceScorer(ref)(**batch.scorer_inputs())[0]
            else:
                with pair.routed("off") as ref:
                    out = SequenceScorer(ref)(**batch.scorer_inputs())[0]
        cached[kind] = out
        return out

    def dpo_peft():
        ref = reference("peft")
        logps, _, _ = SequenceScorer(peft.model)(**batch.scorer_inputs())
        (-F.logsigmoid(_margins(logps, ref, b)).mean()).backward()
        opt_peft.step()
        opt_peft.zero_grad(set_to_none=True)

    def dpo_pair():
        ref = reference("pair")
        with pair.routed("fast") as model:
            logps, _, _ = SequenceScorer(model)(**batch.scorer_inputs())
            (-F.logsigmoid(_margins(logps, ref, b)).mean()).backward()
        opts["fast"].step()
        opts["fast"].zero_grad(set_to_none=True)

    def ofs_loss(fast_logps, slow_logps, ref):
        h_f, h_s = _margins(fast_logps, ref, b), _margins(slow_logps, ref, b)
        return -F.logsigmoid(h_f).mean() - F.logsigmoid(h_s).mean() + chasing_term(h_f, h_s, ALPHA)[0]

    def ofs_fused():
        ref = reference("pair")
        with pair.routed("split", batch.input_ids.shape[0]) as model:
            logps, _, _ = SequenceScorer(model)(**duplicate_rows(batch).scorer_inputs())
            s = batch.num_sequences
            ofs_loss(logps[:s], logps[s:], ref).backward()
        for opt in opts.values():
            opt.step()
            opt.zero_grad(set_to_none=True)

    def ofs_separate():
        ref = reference("pair")
        out = {}
        for m in ("fast", "slow"):
            with pair.routed(m) as model:
                out[m], _, _ = SequenceScorer(model)(**batch.scorer_inputs())
        ofs_loss(out["fast"], out["slow"], ref).backward()  # both graphs exist; no recomputation needs a route
        for opt in opts.values():
            opt.step()
            opt.zero_grad(set_to_none=True)

    results = {}
    for name, fn in [("dpo_peft", dpo_peft), ("dpo_pair", dpo_pair), ("ofs_fused", ofs_fused),
                     ("ofs_separate", ofs_separate)]:
        times = []
        for _ in range(a.warmup + a.steps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        results[name] = statistics.median(times[a.warmup:])
        print(json.dumps({"run": name, "pairs": b, "tokens_per_copy": int(batch.input_ids.numel()),
                          "cached_reference": a.cached_reference, "median_step_seconds": round(results[name], 3),
                          "steps": [round(t, 3) for t in times],
                          "ratio_to_dpo_peft": round(results[name] / results["dpo_peft"], 3)}), flush=True)


if __name__ == "__main__":
    main()
