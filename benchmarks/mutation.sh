#!/usr/bin/env bash
# Mutation testing (mutmut 3) of maskdsl.codegen.{ir,tiling,blockmask,printer_torch} against a
# fast test subset. Configuration: [tool.mutmut] in pyproject.toml.
#
#   benchmarks/mutation.sh                        full run (resumes: decided mutants are kept)
#   benchmarks/mutation.sh run 'maskdsl.codegen.tiling.*'   only these mutants (names or globs)
#   benchmarks/mutation.sh summary                score = killed / total, survivors listed
#   benchmarks/mutation.sh estimate               mutant counts, expected test time (after a run;
#                                                 replaces mutmut print-time-estimates, see below)
#   benchmarks/mutation.sh results|show NAME|tests-for-mutant NAME|browse   any other mutmut command
#   benchmarks/mutation.sh stage                  only refresh the staging copy
#   benchmarks/mutation.sh clean                  forget every result (removes the staging dir)
#   benchmarks/mutation.sh retest FILE PYTEST-ARGS...   run each mutant named in FILE (one per
#                                                 line) against PYTEST-ARGS in mutants/, one
#                                                 pytest per mutant, "NAME killed|survived";
#                                                 for tests whose code runs in spawned processes,
#                                                 which mutmut's per-test map cannot see
#
# Why a staging copy: the repository keeps codegen/ and kernels/ at the top level and installs
# them as maskdsl.codegen / maskdsl.kernels (package-dir), and the venv's editable finder maps
# those names back to /work/main/codegen. Run in the repository, mutmut would name the mutants
# codegen.tiling.* while the code under test is maskdsl.codegen.tiling (so no test ever reaches
# a mutant), and the tests would import the unmutated originals through the editable finder.
# So the script builds $WORK (default build/mutation, git-ignored) with the installed layout:
# maskdsl/, maskdsl/codegen/, maskdsl/kernels/, tests/, pyproject.toml (plus plugins/ with
# benchmarks/mutation_plugin.py, kept off the mutated tree); mutmut runs there and
# puts its mutated copy in $WORK/mutants/, first on sys.path, ahead of the editable finder.
#
# Environment: MASKDSL_MUTATION_DIR (staging dir), MASKDSL_MUTATION_EXAMPLES (Hypothesis
# examples per property, default 10), MASKDSL_MUTATION_CHILDREN (parallel mutants, default 1),
# MASKDSL_MUTATION_ONLY (files to mutate instead of [tool.mutmut] only_mutate, space-separated,
# installed paths like maskdsl/parallel/plan.py) with MASKDSL_MUTATION_TESTS (the pytest arguments
# selecting their tests, shell-quoted; use a separate MASKDSL_MUTATION_DIR per target).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${MASKDSL_MUTATION_DIR:-$ROOT/build/mutation}
CHILDREN=${MASKDSL_MUTATION_CHILDREN:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
export PYTHONDONTWRITEBYTECODE=1
# The pytest plugin (-p mutation_plugin) lives outside the code under test. `mutmut run` puts
# mutants/ first on sys.path itself; the other commands (browse's retest, ...) do not, so
# it goes on PYTHONPATH for them, and only once it exists (a missing directory on sys.path
# is cached as "nothing here" for the whole process).
PYTHONPATH="$WORK/plugins"
[ "${1:-run}" != run ] && [ -d "$WORK/mutants" ] && PYTHONPATH="$WORK/mutants:$PYTHONPATH"
export PYTHONPATH

# Point the staged [tool.mutmut] at MASKDSL_MUTATION_ONLY and MASKDSL_MUTATION_TESTS.
retarget() {
    python - "$1" <<'EOF'
import json, os, re, shlex, sys
path = sys.argv[1]
text = open(path).read()
only = os.environ["MASKDSL_MUTATION_ONLY"].split()
tests = shlex.split(os.environ.get("MASKDSL_MUTATION_TESTS", ""))
if not tests:
    raise SystemExit("mutation.sh: MASKDSL_MUTATION_ONLY needs MASKDSL_MUTATION_TESTS")
for key, value in (("only_mutate", only), ("pytest_add_cli_args_test_selection", tests)):
    text, n = re.subn(rf"(?ms)^{key} = \[.*?^\]", lambda m: f"{key} = {json.dumps(value)}", text)
    if n != 1:
        raise SystemExit(f"mutation.sh: no {key} in [tool.mutmut]")
open(path, "w").write(text)
EOF
}

stage() {
    mkdir -p "$WORK"
    # Sources are copied with their mtimes (cp -p): mutmut regenerates a file's mutants only
    # when the source is newer than its mutated copy, and per function keeps the verdicts of
    # functions whose code did not change.
    rm -rf "$WORK/maskdsl" "$WORK/tests" "$WORK/plugins"
    cp -Rp "$ROOT/maskdsl" "$WORK/maskdsl"
    cp -Rp "$ROOT/codegen" "$WORK/maskdsl/codegen"
    cp -Rp "$ROOT/kernels" "$WORK/maskdsl/kernels"
    cp -Rp "$ROOT/tests" "$WORK/tests"
    mkdir -p "$WORK/plugins"
    cp -p "$ROOT/benchmarks/mutation_plugin.py" "$WORK/plugins/"
    cp -p "$ROOT/pyproject.toml" "$WORK/pyproject.toml"
    if [ -n "${MASKDSL_MUTATION_ONLY:-}" ]; then retarget "$WORK/pyproject.toml"; fi
    find "$WORK/maskdsl" "$WORK/tests" -name __pycache__ -prune -exec rm -rf {} +
}

# mutmut 3.8.1's `print-time-estimates`, run on its own, saves the stats back with an empty
# test map, after which every mutant comes out "no tests" (so the script does not pass it on;
# see `estimate`). Repair that before a run: drop the stats (they are collected again) and
# forget the "no tests" verdicts.
repair_stats() {
    [ -f "$WORK/mutants/mutmut-stats.json" ] || return 0
    (cd "$WORK" && python - <<'EOF'
import json, pathlib
stats = pathlib.Path("mutants/mutmut-stats.json")
if json.loads(stats.read_text())["tests_by_mangled_function_name"]:
    raise SystemExit
print("mutants/mutmut-stats.json has no test map: collecting stats again")
stats.unlink()
for meta in pathlib.Path("mutants").rglob("*.py.meta"):
    d = json.loads(meta.read_text())
    d["exit_code_by_key"] = {k: (None if v == 33 else v) for k, v in d["exit_code_by_key"].items()}
    meta.write_text(json.dumps(d, indent=4))
EOF
    )
}

# Mutant counts and the test time mutmut expects per mutant (from the stats of the last run).
estimate() {
    cd "$WORK"
    python - <<'EOF'
import json
from collections import Counter
from mutmut.mutation.data import SourceFileMutationData
from mutmut.utils.file_utils import walk_mutatable_files
from mutmut.utils.format_utils import mangled_name_from_mutant_name

st = json.load(open("mutants/mutmut-stats.json"))
tests, dur = st["tests_by_mangled_function_name"], st["duration_by_test"]

def line(name, c):
    print(f"{name:36} {c['mutants']:5} mutants ({c['no tests']} without tests, {c['pending']} not run)"
          f"   tests {c['s'] / 60:6.1f} min ({c['pending s'] / 60:.1f} min not run)")

grand = Counter()
for path in sorted(walk_mutatable_files()):
    m = SourceFileMutationData(path=path)
    m.load()
    c = Counter()
    for key, code in m.exit_code_by_key.items():
        t = tests.get(mangled_name_from_mutant_name(key), [])
        s = sum(dur[x] for x in t)
        c.update({"mutants": 1, "no tests": not t, "pending": code is None, "s": s,
                  "pending s": s if code is None else 0})
    grand += c
    line(str(path), c)
line("total", grand)
print("(worst case: every mutant survives and runs all its tests; a killed one stops at its first failure)")
EOF
}

summary() {
    cd "$WORK"
    python - <<'EOF'
from collections import Counter
from mutmut.mutation.data import SourceFileMutationData
from mutmut.stats import status_by_exit_code
from mutmut.utils.file_utils import walk_mutatable_files

total, survivors = Counter(), []
for path in sorted(walk_mutatable_files()):
    m = SourceFileMutationData(path=path)
    m.load()
    c = Counter(status_by_exit_code[v] for v in m.exit_code_by_key.values())
    total += c
    n = sum(c.values())
    print(f"{str(path):36} {c['killed']:5} / {n:<5} killed   " + ", ".join(
        f"{k} {v}" for k, v in sorted(c.items()) if k != "killed"))
    survivors += [k for k, v in m.exit_code_by_key.items() if status_by_exit_code[v] == "survived"]
n = sum(total.values())
print(f"{'total':36} {total['killed']:5} / {n:<5} killed   "
      + ", ".join(f"{k} {v}" for k, v in sorted(total.items()) if k != "killed"))
if n:
    print(f"score (killed / total): {total['killed'] / n:.1%}")
print(f"\nsurvivors ({len(survivors)}; see one with: benchmarks/mutation.sh show NAME):")
for s in survivors:
    print("   ", s)
EOF
}

cmd=${1:-run}
[ $# -gt 0 ] && shift
case "$cmd" in
    stage)   stage ;;
    clean)   rm -rf "$WORK" ;;
    summary) summary ;;
    estimate|print-time-estimates) estimate ;;
    retest)  [ $# -ge 2 ] || { echo "mutation.sh retest FILE PYTEST-ARGS..." >&2; exit 2; }
             names=$(cat "$1"); shift; cd "$WORK/mutants"
             export PYTHONPATH="$WORK/mutants:$WORK/plugins"
             python -m pytest -x -q -p no:cacheprovider -p no:xdist "$@" >/dev/null 2>&1 \
                 || { echo "mutation.sh retest: the unmutated code fails these tests" >&2; exit 1; }
             for m in $names; do
                 if MUTANT_UNDER_TEST=$m python -m pytest -x -q -p no:cacheprovider -p no:xdist \
                        "$@" >/dev/null 2>&1; then echo "$m survived"; else echo "$m killed"; fi
             done ;;
    run)     stage; repair_stats; cd "$WORK"; exec mutmut run --max-children "$CHILDREN" "$@" ;;
    *)       cd "$WORK"; exec mutmut "$cmd" "$@" ;;
esac
