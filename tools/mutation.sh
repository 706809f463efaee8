#!/usr/bin/env bash
# Mutation testing of the method modules (mutmut 3, fast tests on tiny models only). Not part of .ci/run: the
# whole run takes several hours on 2 cores the first time (the README's section on tests has the last table).
#
#   tools/mutation.sh                 # every group, then the report
#   tools/mutation.sh merging ropo    # some groups (tools/mutation.py groups lists them), then the report
#   tools/mutation.sh --report        # the report of what has run
#
# Each group runs in its own copy of the checkout under .mutation/<group>/ (MUTATION_DIR to move it), refreshed from
# the working tree at every run; mutmut keeps each mutant's result there, so a rerun tests only the functions that
# changed, the mutants that survived are tried again, and an interrupted run goes on where it stopped. Each worker runs one thread (MUTATION_JOBS workers, 2).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
work=${MUTATION_DIR:-$root/.mutation}
if [[ "${1:-}" != "--report" ]]; then
  python -c "import mutmut" 2>/dev/null || pip install -q 'mutmut==3.8.1'
  groups=("$@")
  [[ ${#groups[@]} -gt 0 ]] || read -r -a groups <<< "$(python tools/mutation.py groups)"
  export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
  for group in "${groups[@]}"; do
    dir="$work/$group"
    mkdir -p "$dir"
    # the checkout's files (tracked and untracked, not ignored) replace the copy's; mutmut's mutants/ stays
    git ls-files -co --exclude-standard -z | tar --null -T - -cf - | tar -xf - -C "$dir"
    python tools/mutation.py config "$group" > "$dir/setup.cfg"
    python tools/mutation.py retry "$dir"  # survivors are tried again: the tests may have changed since
    echo "== mutation group $group ($(date +%T))"
    start=$SECONDS
    if ! (cd "$dir" && mutmut run --max-children "${MUTATION_JOBS:-2}" > mutmut.log 2>&1); then
      if grep -q "none match any mutant key" "$dir/mutmut.log"; then  # stale test statistics: start the group afresh
        echo "   the code moved under the kept results: testing $group afresh"
        rm -rf "$dir/mutants"
        (cd "$dir" && mutmut run --max-children "${MUTATION_JOBS:-2}" > mutmut.log 2>&1) || true
      fi
      if ! grep -q "mutations/second" "$dir/mutmut.log"; then
        tr '\r' '\n' < "$dir/mutmut.log" | tail -40
        echo "mutmut failed in $dir (its log: $dir/mutmut.log)" >&2
        exit 1
      fi
    fi
    echo "== $group: $((SECONDS - start)) s: $(tr '\r' '\n' < "$dir/mutmut.log" | grep -a '/' | tail -1)"
  done
fi
python tools/mutation.py report "$work"
