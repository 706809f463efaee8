"""One process against 2 processes under DDP, FSDP, DeepSpeed ZeRO-2 and ZeRO-3, on the built-in model.

    python benchmarks/bench_engines.py --kind lora --steps 6
    python benchmarks/bench_engines.py --kind full --steps 4 --engines single fsdp zero3

Every run trains ``preflab train configs/dpo.yaml`` (its model and sentiment pairs) with the same global batch
(``--batch`` pairs: one process takes all of them, two processes half each), without evaluation or diagnostics and
without the reference cache (each step runs its reference forward). A multi-process run is started with
``accelerate launch`` and the shipped config file. Prints one JSON line per run: the median step time after the
first step (``metrics.jsonl``'s ``step_seconds``), the run's wall time, and the peak resident memory of its
largest process (``ru_maxrss`` of the waited-for children: on a GPU machine, read GPU memory instead).
On a CPU the processes share the cores (each gets ``cores / processes`` threads), so these times measure the
engines' overhead, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# runs a command and prints the peak resident memory (KiB) of its largest process, itself or a descendant
_MEASURED = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:], stdout=sys.stderr).returncode; "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")
CONFIGS = {"ddp": "ddp.yaml", "fsdp": "fsdp.yaml", "zero2": "deepspeed_zero2.yaml", "zero3": "deepspeed_zero3.yaml"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(engine: str, kind: str, batch: int, steps: int, out: Path) -> dict:
    processes = 1 if engine == "single" else 2
    args = [str(ROOT / "configs" / "dpo.yaml"), f"output_dir={out}", f"parametrization={{kind: {kind}}}",
            f"train.batch_size={batch // processes}", f"train.max_steps={steps}", "train.save_steps=null",
            "train.progress=false", "diag.enabled=false", "eval.task=null", "data.eval=null",
            "scorer.reference_cache=none", "train.lr=1e-5" if kind == "full" else "train.lr=1e-3"]
    cores = os.cpu_count() or 1
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // processes)), "TOKENIZERS_PARALLELISM": "false"}
    if engine == "single":
        cmd = [sys.executable, "-m", "preflab.cli", "train", *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
               str(ROOT / "configs" / "accelerate" / CONFIGS[engine]), "--main_process_port", str(_free_port()),
               "-m", "preflab.cli", "train", *args]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _MEASURED, *cmd], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
        return {"engine": engine, "kind": kind, "error": (errors or [proc.stderr[-500:]])[0]}
    peak = int(proc.stdout.split()[-1])  # KiB
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step_seconds = [r["step_seconds"] for r in records[1:]] or [records[0]["step_seconds"]]
    return {"engine": engine, "kind": kind, "processes": processes, "global_batch": batch, "steps": steps,
            "median_step_s": round(statistics.median(step_seconds), 3), "wall_s": round(wall, 1),
            "peak_rss_gib_largest_process": round(peak / 2**20, 2),
            "final_loss": round(records[-1]["loss"], 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", default="lora", choices=["lora", "full", "dora", "ropo"])
    p.add_argument("--batch", type=int, default=8, help="global batch (pairs per step)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--engines", nargs="+", default=["single", "ddp", "fsdp", "zero2", "zero3"],
                   choices=["single", *CONFIGS])
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for engine in args.engines:
            print(json.dumps(run(engine, args.kind, args.batch, args.steps, Path(tmp) / engine)), flush=True)


if __name__ == "__main__":
    main()
