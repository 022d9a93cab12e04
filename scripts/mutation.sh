#!/usr/bin/env bash
# Mutation testing of fqtorch's core with mutmut 3.8 (docs/testing.md). Not part of CI: run it
# before resolving work that touches src/fqtorch/{quantizers,nn,backends,stats}/.
#
#   pip install -e ".[dev,mutation]"
#   scripts/mutation.sh                      # all four folders, one after the other
#   scripts/mutation.sh quantizers nn        # only these folders
#   scripts/mutation.sh --recheck stats      # also re-test the sample's survivors (after new tests)
#   scripts/mutation.sh --report             # print the scores so far, run nothing
#
# Per folder F it
#   1. mirrors src/, tests/ and pyproject.toml into $MUTATION_DIR/F: outside the checkout, so
#      mutmut's mutants/ tree never lands in the repo and edits made meanwhile do not move under a
#      running test; a rerun mirrors again and mutmut regenerates only the changed functions;
#   2. writes that copy's setup.cfg: mutate src/fqtorch/F/*, test with tests/F/ (mutmut then runs
#      for each mutant only the tests of tests/F/ that call the mutated function);
#   3. generates the mutants and draws a reproducible random sample of MUTATION_SAMPLE of them
#      (the MUTATION_SAMPLE smallest sha256("MUTATION_SEED:name") values: the same mutants on
#      every run, and adding or removing functions elsewhere does not reshuffle it);
#   4. runs the sampled mutants that have no verdict yet, niced (other people share the cores),
#      with MUTATION_JOBS workers, for at most MUTATION_BUDGET seconds; verdicts are kept in
#      $MUTATION_DIR/F/mutants/, so a run cut short resumes where it stopped;
#   5. prints the killed share of the sample with its 95% Clopper-Pearson interval, the survivors
#      (inspect one with: cd $MUTATION_DIR/F && mutmut show NAME) and the untested rest.
#
# Environment: MUTATION_SAMPLE (per folder, default 80; 0 = every mutant), MUTATION_SEED (0),
# MUTATION_JOBS (2), MUTATION_BUDGET (seconds per folder, default 1800; the first run of a folder
# also spends one traced pass over its tests and one clean pass, which count against it),
# MUTATION_DIR (default ${XDG_CACHE_HOME:-~/.cache}/fqtorch-mutation), MUTATION_SKIP (source files
# left unmutated, space-separated globs such as "src/fqtorch/nn/attention.py": for someone else's
# work in progress; say so when you report a score), MUTATION_PYTEST_ARGS (extra pytest arguments,
# e.g. "--deselect tests/x.py::test_y" for a test someone is still fixing: mutmut needs a green run).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
sample="${MUTATION_SAMPLE:-80}"
seed="${MUTATION_SEED:-0}"
jobs="${MUTATION_JOBS:-2}"
budget="${MUTATION_BUDGET:-1800}"
skip="${MUTATION_SKIP:-}"
pytest_args="${MUTATION_PYTEST_ARGS:-}"
root="${MUTATION_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/fqtorch-mutation}"
all_folders=(quantizers nn backends stats)

recheck=0
report_only=0
folders=()
for arg in "$@"; do
    case "$arg" in
        --recheck) recheck=1 ;;
        --report) report_only=1 ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        quantizers | nn | backends | stats) folders+=("$arg") ;;
        *)
            echo "scripts/mutation.sh: unknown argument '$arg'; expected --recheck, --report or" \
                "folders among: ${all_folders[*]}" >&2
            exit 2
            ;;
    esac
done
[ ${#folders[@]} -gt 0 ] || folders=("${all_folders[@]}")
if ! command -v mutmut >/dev/null; then
    echo "scripts/mutation.sh: mutmut is not installed; run: pip install -e \".[mutation]\"" >&2
    exit 2
fi

# One thread per worker: MUTATION_JOBS workers fill the cores, and forked workers never inherit a
# busy OpenMP pool. Inductor compiles in-process for the same reason.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TORCHINDUCTOR_COMPILE_THREADS=1
low() { nice -n 19 "$@"; }

# Python helper run inside a folder's copy: `sample` prints the names of the sample's mutants
# still to test; `report` prints the folder's score. Reads mutmut's mutants/**/*.py.meta files.
helper() {
    low python - "$@" <<'PY'
import fnmatch, hashlib, json, os, sys
from pathlib import Path
from scipy.stats import beta

mode, folder, size, seed, recheck = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1"
skip = os.environ.get("MUTATION_SKIP", "").split()
codes = {}
for meta in sorted(Path("mutants/src/fqtorch", folder).rglob("*.py.meta")):
    source = str(meta.relative_to("mutants"))[: -len(".meta")]
    if any(fnmatch.fnmatch(source, pattern) for pattern in skip):
        continue
    codes.update(json.loads(meta.read_text())["exit_code_by_key"])
key = lambda name: hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()
chosen = sorted(codes, key=key)[: size or None]
# mutmut's exit codes: 1 and 3 killed, 36/24/-24/152/255 timeout (killed), 0 survived,
# 5/33 no test ran it (survived), None not yet tested; anything else is suspicious.
killed_codes = {1, 3, 36, 24, -24, 152, 255}
if mode == "sample":
    todo = [n for n in chosen if codes[n] is None or (recheck and codes[n] not in killed_codes)]
    print("\n".join(todo))
    sys.exit()
done = [n for n in chosen if codes[n] is not None]
killed = sum(codes[n] in killed_codes for n in done)
survivors = sorted(n for n in done if codes[n] not in killed_codes)
n, k = len(done), killed
what = "all" if len(chosen) == len(codes) else f"a random sample (seed {seed}) of {len(chosen)}"
print(f"[{folder}] {len(codes)} mutants; tested {n} of {what}, {len(chosen) - n} still untested")
if n:
    lo = beta.ppf(0.025, k, n - k + 1) if k > 0 else 0.0
    hi = beta.ppf(0.975, k + 1, n - k) if k < n else 1.0
    print(f"[{folder}] killed {k}/{n} = {k / n:.1%}  (95% Clopper-Pearson interval {lo:.1%}-{hi:.1%})")
module = lambda name: name.split(".x")[0]
for mod in sorted({module(name) for name in chosen}):
    mine = [name for name in done if module(name) == mod]
    print(f"[{folder}]   {mod}: killed {sum(codes[m] in killed_codes for m in mine)}/{len(mine)}")
for name in survivors:
    print(f"[{folder}]   survived: {name}  (exit code {codes[name]})")
PY
}

for folder in "${folders[@]}"; do
    work="$root/$folder"
    mkdir -p "$work"
    if [ "$report_only" = 0 ]; then
        start=$(date +%s)
        echo "== $folder: mirroring the checkout into $work"
        for path in src tests; do
            rm -rf "${work:?}/$path"
            cp -a "$repo/$path" "$work/$path" # -a keeps the mtimes mutmut compares
            find "$work/$path" -name __pycache__ -prune -exec rm -rf {} +
        done
        cp -p "$repo/pyproject.toml" "$work/pyproject.toml"
        cat >"$work/setup.cfg" <<CFG
# written by scripts/mutation.sh
[mutmut]
source_paths = src
only_mutate = src/fqtorch/$folder/*
pytest_add_cli_args_test_selection = tests/$folder/
pytest_add_cli_args =
    -p
    no:cacheprovider
$(for arg in $pytest_args; do echo "    $arg"; done)
# Each pytest run in a fresh fork of a server that has imported torch and fqtorch, but no test
# module: a module-level parametrize over an iterator is consumed by its first collection.
process_isolation = forkserver
forkserver_warmup = import
preload_modules_file = preload.txt
do_not_mutate =
    __no_such_file__.py
$(for pattern in $skip; do echo "    $pattern"; done)
CFG
        printf '%s\n' torch numpy scipy.stats fqtorch fqtorch.stats >"$work/preload.txt"
        cd "$work"
        echo "== $folder: generating mutants"
        low python - "$jobs" >"$work/generate.log" 2>&1 <<'PY' || { cat "$work/generate.log"; exit 1; }
import sys
from mutmut.__main__ import copy_also_copy_files, copy_src_dir, create_mutants
from mutmut.mutation.trampoline import set_mutant_under_test

set_mutant_under_test("mutant_generation")
copy_src_dir()
copy_also_copy_files()
create_mutants(int(sys.argv[1]))
PY
        mapfile -t todo < <(helper sample "$folder" "$sample" "$seed" "$recheck")
        left=$((budget - ($(date +%s) - start)))
        if [ ${#todo[@]} -gt 0 ] && [ "$left" -gt 0 ]; then
            echo "== $folder: testing ${#todo[@]} mutants (at most ${left}s; rerun to resume)"
            # SIGINT makes mutmut stop its workers and keep every verdict it has.
            timeout --signal=INT --kill-after=60 "$left" \
                nice -n 19 mutmut run --max-children "$jobs" "${todo[@]}" >"$work/last-run.log" 2>&1 \
                || echo "== $folder: mutmut stopped (exit $?); its log: $work/last-run.log"
            tail -n 3 "$work/last-run.log"
        fi
        echo "== $folder: $(($(date +%s) - start)) s"
        cd "$repo"
    fi
    if [ -d "$work/mutants" ]; then
        (cd "$work" && helper report "$folder" "$sample" "$seed" 0)
    else
        echo "[$folder] no mutation run yet"
    fi
done
