"""One DPO training step, preflab against TRL's DPOTrainer: step time, tokens/s and peak memory.

    python benchmarks/bench_vs_trl.py                         # CPU: the built-in model, 4 pairs, LoRA r 16
    python benchmarks/bench_vs_trl.py --shapes long --steps 5 --variants shared,shared+cache
    python benchmarks/bench_vs_trl.py --device cuda --model random:1.7B --param full --pairs 8 \\
        --shapes gpu --precision bf16                        # a GPU row of ../PERFORMANCE.md's table

Every measurement runs in a fresh child process (so its peak RSS is its own) on the same synthetic pairs:
strings of about ``prompt`` and ``response`` tokens, the same strings for both tools, tokenized by each the same
way (special tokens, EOS appended to responses). Tokens are counted as TRL counts them: prompt + chosen +
prompt + rejected. The first ``--warmup`` steps are dropped and the median of the rest reported. Peak memory
is the child's peak RSS on CPU (model loading included) and ``torch.cuda.max_memory_allocated`` on a GPU.

preflab variants (``--variants``): ``padded`` (a row per response, reference forward every step),
``shared`` (prefix sharing), ``packed`` (prefix sharing, pairs packed into rows), each with ``+cache``
(reference log-probs precomputed before the first step; the time that takes is reported as
``cache_seconds``, outside the steps; for TRL's precompute row it is the time of its constructor, which
tokenizes the data and precomputes). TRL runs with its defaults for the same work (``trl`` row) and, with
``--trl-precompute``, also with ``precompute_ref_log_probs=True``. A failed run is printed with its error,
never dropped. TRL is an optional extra: ``pip install trl``.

Output: one JSON line per (shape, preflab variant) with both tools' figures and the ratios
``speedup = preflab tokens/s ÷ TRL tokens/s`` and ``memory_ratio = preflab peak ÷ TRL peak``; progress goes
to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {"short": (64, 128), "long": (256, 128), "gpu": (256, 256)}  # prompt, response tokens
RANDOM_MODELS = {  # SmolLM2 shapes (PERFORMANCE.md): layers, hidden, intermediate, heads, kv heads
    "random:360M": (32, 960, 2560, 15, 5),
    "random:1.7B": (24, 2048, 8192, 32, 32),
}
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16


# -- data and model, shared by both workers -------------------------------------------------------------------

def _text(tokenizer, rng: random.Random, tokens: int) -> str:
    """A string of about ``tokens`` tokens of common words."""
    words = ("the of and to in is was for on that with as by at from this have not are but had they which "
             "one you were all we when there can an been has more if will would so what about out up into "
             "time only new some could these two may first then do any like my now over such our man me even "
             "most made after also did many before must through back years where much your way well down "
             "should because each just those people how too little state good very make world still own see "
             "men work long get here between both life being under never day same another know while last").split()
    ids = tokenizer(" ".join(rng.choice(words) for _ in range(tokens * 2)), add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[:tokens])


def write_pairs(tokenizer, path: Path, n: int, prompt: int, response: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            row = {"prompt": _text(tokenizer, rng, prompt), "chosen": " " + _text(tokenizer, rng, response),
                   "rejected": " " + _text(tokenizer, rng, response)}
            f.write(json.dumps(row) + "\n")


def load_model(name: str, dtype: str):
    import torch

    from preflab.models.loader import load_model as preflab_load

    if name in RANDOM_MODELS:
        from transformers import LlamaConfig, LlamaForCausalLM

        layers, hidden, inter, heads, kv = RANDOM_MODELS[name]
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=8192,
                             tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
        config._attn_implementation = "sdpa"
        return LlamaForCausalLM(config).to(getattr(torch, dtype))
    return preflab_load(name, dtype, "sdpa")


def _peak_memory(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _tokens_per_pair(tokenizer, path: Path) -> list[int]:
    from preflab.data.formats import normalize_row
    from preflab.data.tokenize import PairTokenizer

    pt = PairTokenizer(tokenizer, max_length=4096, max_prompt_length=2048)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [pt(normalize_row(r, f"row {i}")).num_tokens for i, r in enumerate(rows)]


# -- workers (child processes) --------------------------------------------------------------------------------

def worker_preflab(a) -> dict:
    import torch

    from preflab.config import load_config
    from preflab.train import TrainingRun

    layout, _, cache = a.variant.partition("+")
    out = Path(a.workdir) / f"preflab-{a.variant}"
    cache_dir = Path(a.workdir) / f"reference-cache-{a.variant}"
    shutil.rmtree(cache_dir, ignore_errors=True)  # the cache's cost is measured, never an earlier run's cache
    overrides = [f"model.name={a.model_dir}", f"model.dtype={a.dtype}", f"data.train={a.data}",
                 f"output_dir={out}", "resume=never", "train.progress=false", f"train.batch_size={a.pairs}",
                 f"train.max_steps={a.warmup + a.steps}", "train.lr=1e-5", "train.warmup_ratio=0",
                 f"train.precision={a.precision}", "train.max_grad_norm=0", "train.eval_batch_size=8",
                 "train.save_steps=null", f"scorer.layout={layout}", "data.max_length=4096",
                 "data.max_prompt_length=2048",
                 f"scorer.reference_cache={'precompute' if cache else 'none'}",
                 f"scorer.reference_cache_dir={cache_dir}", f"scorer.chunk_size={a.chunk_size}",
                 f"parametrization.kind={a.param}"] + ([f"parametrization.r={a.lora_r}", "parametrization.alpha=32",
                                                        "parametrization.dropout=0"] if a.param == "lora" else [])
    config = load_config(None, overrides)
    run = TrainingRun(config)
    cache_seconds = None
    if cache:
        t0 = time.perf_counter()
        run.precompute_reference()
        cache_seconds = time.perf_counter() - t0
    run.scorer.train()
    times, tokens = [], []
    for _ in range(a.warmup + a.steps):
        if a.device == "cuda":
            torch.cuda.synchronize()
        record = run.optimizer_step()
        if a.device == "cuda":
            torch.cuda.synchronize()
        times.append(record["step_seconds"])
        tokens.append(record["tokens_per_second"] * record["step_seconds"])
    return {"step_seconds": times, "tokens": tokens, "cache_seconds": cache_seconds}


def worker_trl(a) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from preflab.models.loader import load_tokenizer

    tokenizer = load_tokenizer(a.model_dir)
    model = load_model(a.model_dir, a.dtype)
    peft_config = None
    if a.param == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=a.lora_r, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if a.device == "cuda":
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if a.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    args = DPOConfig(output_dir=str(Path(a.workdir) / f"trl-{a.variant}"), per_device_train_batch_size=a.pairs,
                     max_steps=a.warmup + a.steps, learning_rate=1e-5, lr_scheduler_type="constant", logging_steps=1,
                     report_to=[], save_strategy="no", use_cpu=a.device == "cpu", bf16=a.precision == "bf16",
                     max_length=None, gradient_checkpointing=False, beta=0.1, dataloader_num_workers=0,
                     precompute_ref_log_probs=a.variant == "precompute", max_grad_norm=0.0, disable_tqdm=True,
                     seed=0)
    dataset = load_dataset("json", data_files=a.data, split="train")
    t0 = time.perf_counter()  # TRL tokenizes (and, with precompute_ref_log_probs, precomputes) in its constructor
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[Timer()])
    setup = time.perf_counter() - t0
    trainer.train()
    return {"step_seconds": times, "cache_seconds": setup if a.variant == "precompute" else None}


def _worker(a) -> None:
    import torch

    torch.manual_seed(0)
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        result = (worker_trl if a.worker == "trl" else worker_preflab)(a)
        result["peak_gib"] = _peak_memory(a.device)
    except Exception as exc:  # reported, never hidden
        result = {"error": f"{type(exc).__name__}: {exc}"[-2000:]}
    print("RESULT " + json.dumps(result), flush=True)


# -- the driver -----------------------------------------------------------------------------------------------

def _measure(a, worker: str, variant: str, data: Path, model_dir: str, per_step_tokens: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", worker, "--variant", variant, "--data", str(data),
           "--model-dir", model_dir, "--workdir", a.workdir, "--pairs", str(a.pairs), "--steps", str(a.steps),
           "--warmup", str(a.warmup), "--param", a.param, "--lora-r", str(a.lora_r), "--precision", a.precision,
           "--dtype", a.dtype, "--device", a.device, "--threads", str(a.threads), "--chunk-size", str(a.chunk_size)]
    print(f"[bench] {worker} {variant} on {data.stem} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        return {"error": f"exit {proc.returncode}: {proc.stderr[-1500:]}"}
    result = json.loads(lines[-1][len("RESULT "):])
    if "error" in result:
        return result
    steps = result["step_seconds"][a.warmup:]
    if len(steps) < a.steps:
        return {"error": f"only {len(steps)} measured steps: {result['step_seconds']}"}
    median = statistics.median(steps)
    out = {"step_seconds": round(median, 4), "step_seconds_all": [round(s, 3) for s in result["step_seconds"]],
           "tokens_per_second": round(per_step_tokens / median, 2), "peak_gib": round(result["peak_gib"], 3),
           "wall_seconds": round(time.perf_counter() - t0, 1)}
    if result.get("cache_seconds") is not None:
        out["cache_seconds"] = round(result["cache_seconds"], 2)
    if "tokens" in result:  # preflab counts the tokens itself: it must agree with the driver's count
        out["tokens_per_step_counted"] = statistics.median(result["tokens"][a.warmup:])
    print(f"[bench]   {json.dumps(out)}", file=sys.stderr, flush=True)
    return out


def _mfu(a, tokens_per_second: float, cached: bool) -> float | None:
    """Model FLOPs utilisation: 6N per token for the policy (4N with LoRA: no weight gradients), + 2N for the
    reference forward unless it is cached, over the GPU's dense bf16 peak."""
    import torch

    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    if peak is None:
        return None
    flops = ((4 if a.param == "lora" else 6) + (0 if cached else 2)) * a.num_params
    return round(tokens_per_second * flops / peak, 4)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="a preflab model name, or random:360M|random:1.7B")
    p.add_argument("--pairs", type=int, default=4, help="pairs per step")
    p.add_argument("--shapes", default="long,short", help=f"comma list of {sorted(SHAPES)}")
    p.add_argument("--variants", default="padded,shared,shared+cache,packed+cache")
    p.add_argument("--tools", default="preflab,trl")
    p.add_argument("--trl-precompute", action="store_true", help="also TRL with precompute_ref_log_probs=True")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--param", default="lora", choices=("lora", "full"))
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=0, help="torch threads per child (0: torch's default)")
    p.add_argument("--chunk-size", type=int, default=256, help="preflab's scorer.chunk_size")
    p.add_argument("--workdir", default=None)
    # child-process arguments
    p.add_argument("--worker", choices=("preflab", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        _worker(a)
        return

    from preflab.models.loader import load_tokenizer

    a.workdir = a.workdir or tempfile.mkdtemp(prefix="preflab-bench-")
    Path(a.workdir).mkdir(parents=True, exist_ok=True)
    model_dir = a.model
    if a.model in RANDOM_MODELS:  # saved once, so both tools load the same weights
        model_dir = str(Path(a.workdir) / a.model.replace(":", "-"))
        if not Path(model_dir).is_dir():
            model = load_model(a.model, a.dtype)
            model.save_pretrained(model_dir)
            load_tokenizer("smollm2-135m-instruct").save_pretrained(model_dir)
    tokenizer = load_tokenizer(model_dir)
    a.num_params = sum(p.numel() for p in load_model(model_dir, a.dtype).parameters()) if a.device == "cuda" else 0
    tools = a.tools.split(",")
    for shape in a.shapes.split(","):
        prompt, response = SHAPES[shape]
        data = Path(a.workdir) / f"{shape}.jsonl"
        write_pairs(tokenizer, data, a.pairs * (a.warmup + a.steps), prompt, response)
        counts = _tokens_per_pair(tokenizer, data)
        per_step = round(statistics.mean(counts) * a.pairs)
        common = {"shape": shape, "prompt_tokens": prompt, "response_tokens": response, "pairs": a.pairs,
                  "model": a.model, "param": a.param, "precision": a.precision, "device": a.device,
                  "tokens_per_step": per_step, "threads": a.threads or os.cpu_count()}
        peers = {}
        if "trl" in tools:
            peers["trl"] = _measure(a, "trl", "default", data, model_dir, per_step)
            if a.trl_precompute:
                peers["trl_precompute"] = _measure(a, "trl", "precompute", data, model_dir, per_step)
        for variant in a.variants.split(",") if "preflab" in tools else []:
            ours = _measure(a, "preflab", variant, data, model_dir, per_step)
            line = {**common, "variant": variant, "preflab": ours, **peers}
            if a.device == "cuda":
                for name, result in [("preflab", ours), *peers.items()]:
                    if "error" not in result:
                        result["mfu"] = _mfu(a, result["tokens_per_second"], name != "trl" and "+cache" in variant
                                             or name == "trl_precompute")
            for name, peer in peers.items():
                if "error" in ours or "error" in peer:
                    continue
                line[f"speedup_vs_{name}"] = round(ours["tokens_per_second"] / peer["tokens_per_second"], 3)
                line[f"memory_ratio_vs_{name}"] = round(ours["peak_gib"] / peer["peak_gib"], 3)
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
