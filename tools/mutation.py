"""Mutation testing of the method modules with mutmut 3: the groups, their configs and the report.

``tools/mutation.sh`` runs it (see there and the README's section on tests). Each group is a set of method modules
and the fast tests that cover them (tiny models; never the ``slow`` real-model tests, never the multi-process
ones). A group runs in its own copy of the checkout under ``.mutation/<group>/``, where mutmut keeps every
mutant's result: a rerun tests only the mutants of functions that changed, and an interrupted run goes on where it
stopped.

    python tools/mutation.py config GROUP     # the group's mutmut config (setup.cfg)
    python tools/mutation.py retry DIR        # mark the mutants not caught yet in DIR for testing again
    python tools/mutation.py report [DIR]     # per-module table and the surviving mutants (DIR: .mutation)

A surviving mutant is either killed by a new test or listed in ``tools/mutation-equivalent.txt`` as equivalent
(it cannot change behaviour), one line each::

    preflab/optim/merging.py::topk_mask: `old line` -> `new line`  # why it changes nothing

keyed by the changed line, not by mutmut's mutant number (which shifts when a function is edited). The score of a
module is killed / (mutants − equivalent); the target is ≥ 90% in every module.
"""

from __future__ import annotations

import ast
import json
import os
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENT_FILE = ROOT / "tools" / "mutation-equivalent.txt"

# group: (modules to mutate, the fast tests that cover them: paths or globs under the checkout)
GROUPS: dict[str, tuple[list[str], list[str]]] = {
    "losses": (["preflab/losses/*"], ["tests/losses", "tests/eval/test_preference.py"]),
    "ofs": (["preflab/ofs/*"], ["tests/ofs", "tests/losses/test_ofs_chasing.py", "tests/adapters/test_combine.py",
                                "tests/train/test_ofs.py", "tests/train/test_cofs.py"]),
    "merging": (["preflab/optim/merging.py"], ["tests/optim"]),
    "ropo": (["preflab/adapters/ropo.py"], ["tests/adapters/test_ropo*.py"]),
    "apo": (["preflab/train/apo.py"], ["tests/train/test_apo.py", "tests/train/test_apo_math.py",
                                       "tests/train/test_apo_records.py", "tests/train/test_schedule_settings.py"]),
    "ofs_schedule": (["preflab/train/ofs.py"], ["tests/train/test_ofs.py", "tests/train/test_schedule_settings.py"]),
    "cofs": (["preflab/train/cofs.py", "preflab/train/cofs_combine.py"], ["tests/train/test_cofs*.py",
                                                                           "tests/train/test_schedule_settings.py"]),
    "diagnostics": (["preflab/eval/diagnostics.py"], ["tests/eval/test_diagnostics*.py"]),
}

STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 36: "timeout", -24: "timeout",
          24: "timeout", 152: "timeout", 255: "timeout", None: "not checked"}
DETECTED = {"killed", "timeout"}  # a mutant that makes a covering test fail or hang is caught


def config(group: str) -> str:
    modules, patterns = GROUPS[group]
    tests = sorted(str(path.relative_to(ROOT)) for pattern in patterns for path in ROOT.glob(pattern))
    return "\n".join([
        "[mutmut]",
        "source_paths=preflab",
        "only_mutate=" + "\n    ".join(modules),
        # lines that only log carry no behaviour a test could see
        "do_not_mutate_patterns=^\\s*log\\.(debug|info|warning)\\(",
        '''pytest_add_cli_args=-p no:cacheprovider -m "not slow" -q''',
        "pytest_add_cli_args_test_selection=" + "\n    ".join(tests),
        "",
    ])


def _function(key: str) -> tuple[str, str]:
    """``preflab.optim.merging.xǁOnTIESAdamWǁ_trim__mutmut_14`` → ``preflab/optim/merging.py``, ``OnTIESAdamW._trim``"""
    module, _, name = key.partition("__mutmut_")[0].rpartition(".")
    if name.startswith("xǁ"):  # a method: xǁClassǁmethod
        cls, _, method = name[2:].partition("ǁ")
        name = f"{cls}.{method}"
    else:  # a function: x_function
        name = name[2:]
    return module.replace(".", "/") + ".py", name


def _changed(diff: str) -> str:
    """The changed lines of a mutant's diff as ``\\`old\\` -> \\`new\\```."""
    lines = diff.splitlines()
    old = " / ".join(line[1:].strip() for line in lines if line.startswith("-") and not line.startswith("---"))
    new = " / ".join(line[1:].strip() for line in lines if line.startswith("+") and not line.startswith("+++"))
    return f"`{old}` -> `{new}`"


LOG_CALLS = {"debug", "info", "warning", "error", "exception"}


def log_lines(path: Path) -> set[str]:
    """The (stripped) source lines that lie inside a ``log.<level>(...)`` call of a module."""
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in LOG_CALLS \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "log":
            out.update(line.strip() for line in lines[node.lineno - 1:node.end_lineno])
    return out


def load_equivalent() -> dict[str, str]:
    out = {}
    if EQUIVALENT_FILE.is_file():
        for line in EQUIVALENT_FILE.read_text(encoding="utf-8").splitlines():
            if line.strip() and not line.startswith("#"):
                end = line.index("`  # ", line.index(" -> `")) + 1  # the key ends at the new line's closing `
                out[line[:end].strip()] = line[end:].strip().removeprefix("# ")
    return out


def group_results(directory: Path) -> list[dict]:
    """Every mutant of a group directory: module, function, status, the changed lines."""
    here = Path.cwd()
    os.chdir(directory)  # mutmut reads its config (and finds the mutants) relative to the working directory
    try:
        from mutmut.mutation.diff_apply import get_diff_for_mutant

        out = []
        for meta in sorted(Path("mutants").rglob("*.py.meta")):
            source = meta.with_suffix("")
            logging_only = log_lines(source.relative_to("mutants"))
            codes = json.loads(meta.read_text())["exit_code_by_key"]
            for key, code in codes.items():
                _, function = _function(key)
                path = str(source.relative_to("mutants"))  # (a package's __init__.py too)
                status = STATUS.get(code, "suspicious")
                entry = {"key": key, "module": path, "function": function, "status": status}
                if status not in DETECTED:
                    diff = get_diff_for_mutant(key, path=source.relative_to("mutants"))
                    entry["change"] = _changed(diff)
                    removed = [line[1:].strip() for line in diff.splitlines()
                               if line.startswith("-") and not line.startswith("---")]
                    entry["log_only"] = bool(removed) and all(line in logging_only for line in removed)
                out.append(entry)
        return out
    finally:
        os.chdir(here)


def report(work: Path) -> int:
    equivalent, used = load_equivalent(), set()
    rows, survivors = [], []
    for group in GROUPS:
        directory = work / group
        if not (directory / "mutants").is_dir():
            continue
        results = group_results(directory)
        for module in sorted({r["module"] for r in results}):
            counts: Counter = Counter()
            for r in (r for r in results if r["module"] == module):
                counts["mutants"] += 1
                if r["status"] in DETECTED:
                    counts["killed"] += 1
                    continue
                key = f"{r['module']}::{r['function']}: {r['change']}"
                if r["log_only"]:  # a log message's text or arguments: logging never raises, nothing else changes
                    counts["equivalent"] += 1
                    counts["log only"] += 1
                elif key in equivalent:
                    counts["equivalent"] += 1
                    counts["cpu only"] += equivalent[key].startswith("[cpu]")
                    used.add(key)
                else:
                    counts["survived"] += 1
                    if r["status"] == "not checked":
                        counts["not checked"] += 1
                    survivors.append((key, r["key"], r["status"]))
            denominator = counts["mutants"] - counts["equivalent"]
            score = counts["killed"] / denominator if denominator else 1.0
            rows.append((module, counts, score))
    if not rows:
        print(f"no mutation results under {work}; run tools/mutation.sh first")
        return 1
    print(f"{'module':<34} {'mutants':>8} {'killed':>7} {'equivalent':>10} {'survived':>8} {'score':>7}")
    for module, c, score in rows:
        notes = [f"{c['log only']} of the equivalent change only a log call"] if c["log only"] else []
        notes += [f"{c['cpu only']} equivalent only where every device is the CPU"] if c["cpu only"] else []
        notes += [f"{c['not checked']} not checked yet"] if c["not checked"] else []
        print(f"{module:<34} {c['mutants']:>8} {c['killed']:>7} {c['equivalent']:>10} {c['survived']:>8} "
              f"{100 * score:>6.1f}%" + (f"  ({'; '.join(notes)})" if notes else ""))
    total = Counter()
    for _, c, _ in rows:
        total.update(c)
    denominator = total["mutants"] - total["equivalent"]
    print(f"{'all':<34} {total['mutants']:>8} {total['killed']:>7} {total['equivalent']:>10} {total['survived']:>8} "
          f"{100 * total['killed'] / max(denominator, 1):>6.1f}%")
    if survivors:
        print(f"\nsurviving mutants ({len(survivors)}; `mutmut show NAME` in .mutation/<group> shows one):")
        for key, name, status in survivors:
            print(f"  {key}\n      {name} ({status})")
    stale = sorted(set(equivalent) - used)
    if stale:
        print(f"\n{len(stale)} lines of {EQUIVALENT_FILE.name} match no surviving mutant (code changed or now killed):")
        for key in stale:
            print(f"  {key}")
    return 0 if all(score >= 0.9 for _, _, score in rows) else 2


def retry(directory: Path) -> None:
    """Every mutant not caught yet is tested again by the next run (new tests may catch it); caught ones stay. Then
    mutmut's record of which tests call which function is dropped, so that it is collected again: mutmut updates it
    only for new tests, and a function that existing tests have started to call would count as covered by none."""
    again = 0
    for meta in (directory / "mutants").rglob("*.py.meta"):
        data = json.loads(meta.read_text())
        codes = data["exit_code_by_key"]
        for key, code in codes.items():
            if STATUS.get(code, "suspicious") not in DETECTED:
                codes[key] = None
                again += 1
        meta.write_text(json.dumps(data, indent=4))
    if again:
        (directory / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "retry":
        retry(Path(argv[1]))
        return 0
    if len(argv) >= 2 and argv[0] == "config":
        print(config(argv[1]), end="")
        return 0
    if argv and argv[0] == "groups":
        print(" ".join(GROUPS))
        return 0
    if argv and argv[0] == "report":
        return report(Path(argv[1]) if len(argv) > 1 else ROOT / ".mutation")
    print(__doc__)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
