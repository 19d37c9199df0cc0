#!/usr/bin/env bash
# maskdsl GPU kit: one command on a CUDA machine (one H100/H200) with the project checked out and
# nothing else prepared. Within a global budget (default 345 s, under 6 minutes with the Triton
# compiles) it
#   1. records the environment (nvidia-smi, python, torch, triton, natten, git)   -> env.txt
#   2. installs what is missing (maskdsl editable; never torch), NATTEN optional    -> install.log
#   3. runs the CUDA test subset (tests/test_triton.py runs its kernels on the GPU when CUDA is
#      available; plus any test file using requires_cuda)                          -> pytest.log, junit.xml
#   4. runs the GPU rows of benchmarks/run.py (triton section, then flex/attention
#      section), one case per process, each under its own timeout                  -> bench.txt, bench.json
# and writes summary.txt (status, exit code and seconds of every step). A failed step does not
# stop the later ones; the exit status is non-zero if any step failed.
#
#   bash benchmarks/gpu.sh                 # GPU run (falls back to the dry run without CUDA)
#   bash benchmarks/gpu.sh --dry-run       # CPU plumbing check, well under 2 minutes
#   bash benchmarks/gpu.sh --out DIR       # results folder (also: GPU_KIT_OUT=DIR, or a bare DIR)
#
# Results folder: DIR if given; else $OUT/gpu-<stamp> when $OUT is set (the GPU runner returns
# what is under $OUT: at most 8 files, so the folder holds at most 8); else
# benchmarks/results/gpu-<stamp> for a GPU run and /tmp/maskdsl-gpu-kit/gpu-dryrun-<stamp> for a
# dry run (nothing lands in the repo).
#
# Environment knobs (all optional):
#   PYTHON                  interpreter (default: the first of python3, python that imports torch)
#   GPU_KIT_BUDGET_S        global budget in seconds (345; dry run 110)
#   GPU_KIT_TEST_TIMEOUT_S  the test step's limit (150)        GPU_KIT_TEST_WORKERS  xdist workers (8)
#   GPU_KIT_TESTS           test paths/ids for the GPU run (default: see above)
#   GPU_KIT_CASE_TIMEOUT_S  each benchmark case's limit (90)   GPU_KIT_REPS          timed reps (5)
#   GPU_KIT_CASES           "section:name;section:name" to choose/ordering benchmark cases
#   GPU_KIT_FULL=1          benchmark fp16 and bf16 (default: run.py --quick, fp16 only)
#   GPU_KIT_WHEELS          a folder of wheels for offline installs (default: .whl if present)
set -u

ROOT=$(cd "$(dirname "$0")/.." && pwd) || exit 1
cd "$ROOT" || exit 1

usage() { sed -n '2,/^set -u$/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }

DRY=0
DRY_REASON=""
RES_ARG=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1; DRY_REASON="--dry-run given" ;;
        --out) [ $# -ge 2 ] || { echo "gpu.sh: --out needs a folder" >&2; exit 2; }
               RES_ARG=$2; shift ;;
        --out=*) RES_ARG=${1#--out=} ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "gpu.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
        *) [ -z "$RES_ARG" ] || { echo "gpu.sh: one results folder only" >&2; exit 2; }
           RES_ARG=$1 ;;
    esac
    shift
done

export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_NO_INPUT=1

now_ms() { date +%s%3N; }
fmt_s() { printf '%d.%d' $(($1 / 1000)) $((($1 % 1000) / 100)); }
START_MS=$(now_ms)
STAMP=$(date -u +%Y%m%d-%H%M%S)

# ---------------------------------------------------------------- python, CUDA, mode
# the interpreter: $PYTHON, else the first of python3, python that imports torch; and CUDA
TORCH_PROBE="import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)"
PY=""
PROBE_RC=1
for c in ${PYTHON:-python3 python}; do
    command -v "$c" >/dev/null 2>&1 || continue
    timeout 60 "$c" -c "$TORCH_PROBE" >/dev/null 2>&1
    PROBE_RC=$?
    if [ $PROBE_RC = 0 ] || [ $PROBE_RC = 3 ] || [ -n "${PYTHON:-}" ]; then PY=$(command -v "$c"); break; fi
done
[ -n "$PY" ] || PY=$(command -v python3 || command -v python || echo python3)
case $PROBE_RC in
    0) CUDA=1 ;;
    3) CUDA=0; [ $DRY = 1 ] || { DRY=1; DRY_REASON="no CUDA device visible to torch"; } ;;
    *) CUDA=0; [ $DRY = 1 ] || { DRY=1; DRY_REASON="torch not importable by $PY (install a CUDA torch first)"; } ;;
esac
MODE=gpu; [ $DRY = 1 ] && MODE=dry-run
[ $DRY = 0 ] && unset TRITON_INTERPRET     # GPU run: kernels compiled for the GPU, not interpreted

if [ -n "$RES_ARG" ]; then RES=$RES_ARG
elif [ -n "${GPU_KIT_OUT:-}" ]; then RES=$GPU_KIT_OUT
elif [ -n "${OUT:-}" ]; then RES=$OUT/gpu-$STAMP; [ $DRY = 1 ] && RES=$OUT/gpu-dryrun-$STAMP
elif [ $DRY = 1 ]; then RES=${TMPDIR:-/tmp}/maskdsl-gpu-kit/gpu-dryrun-$STAMP
else RES=$ROOT/benchmarks/results/gpu-$STAMP
fi
mkdir -p "$RES" || { echo "gpu.sh: cannot create $RES" >&2; exit 2; }
RES=$(cd "$RES" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/maskdsl-gpu-kit.XXXXXX") || exit 2
trap 'rm -rf "$WORK"' EXIT

if [ $DRY = 1 ]; then BUDGET_S=${GPU_KIT_BUDGET_S:-110}; REPS=${GPU_KIT_REPS:-1}
else BUDGET_S=${GPU_KIT_BUDGET_S:-345}; REPS=${GPU_KIT_REPS:-5}; fi
RESERVE_S=15              # kept back for the merge and the summary
MIN_STEP_S=10             # a step is not started with less than this left
TEST_TIMEOUT_S=${GPU_KIT_TEST_TIMEOUT_S:-150}
CASE_TIMEOUT_S=${GPU_KIT_CASE_TIMEOUT_S:-90}
WHEELS=${GPU_KIT_WHEELS:-}
[ -z "$WHEELS" ] && [ -d "$ROOT/.whl" ] && WHEELS=$ROOT/.whl
if [ $DRY = 1 ]; then
    TEST_ARGS=(tests/test_triton.py -x -q
               -k "test_no_mask_metadata or test_dropout_is_reproducible or test_patterns_the_kernel_cannot_run")
elif [ -n "${GPU_KIT_TESTS:-}" ]; then
    read -r -a TEST_ARGS <<<"$GPU_KIT_TESTS"
else
    TEST_ARGS=(tests/test_triton.py)
    for f in $(grep -l "requires_cuda" tests/test_*.py 2>/dev/null); do
        [ "$f" = tests/test_triton.py ] || TEST_ARGS+=("$f")
    done
fi
export PY ROOT WORK WHEELS DRY CUDA RES MODE

# ---------------------------------------------------------------- steps and the summary
SUMMARY=$RES/summary.txt
for f in env.txt install.log pytest.log junit.xml bench.txt bench.json DRY_RUN; do rm -f "$RES/$f"; done
N_STEPS=0; N_FAILED=0; N_SKIPPED=0
{
    echo "# maskdsl GPU kit  mode=$MODE${DRY_REASON:+ ($DRY_REASON)}"
    echo "# started $(date -u +%Y-%m-%dT%H:%M:%SZ)  budget ${BUDGET_S}s  python $PY  results $RES"
    printf '%-8s %4s %8s  %s\n' "#status" rc seconds step
} >"$SUMMARY"

elapsed_s() { echo $((($(now_ms) - START_MS) / 1000)); }
left_s() { echo $((BUDGET_S - $(elapsed_s) - RESERVE_S)); }

# record STATUS RC MS NAME [NOTE]; STATUS: ok FAIL TIMEOUT NOBUDGET (failures) or skip (not one)
record() {
    local status=$1 rc=$2 ms=$3 name=$4 note=${5:-}
    N_STEPS=$((N_STEPS + 1))
    case $status in ok) ;; skip) N_SKIPPED=$((N_SKIPPED + 1)) ;; *) N_FAILED=$((N_FAILED + 1)) ;; esac
    printf '%-8s %4s %8s  %s%s\n' "$status" "$rc" "$(fmt_s "$ms")" "$name" "${note:+  -- $note}" >>"$SUMMARY"
    printf '   -> %s (rc %s, %ss)%s\n' "$status" "$rc" "$(fmt_s "$ms")" "${note:+: $note}"
}

# run_step NAME MAX_S LOG CMD...: run CMD under timeout (SIGINT first, so pytest still writes
# its junit xml; SIGKILL 10 s later), output appended to LOG; sets STEP_RC and STEP_MS
run_step() {
    local name=$1 max=$2 log=$3 left t t0
    shift 3
    left=$(left_s)
    echo "== [$name] (limit ${max}s, ${left}s of budget left)"
    if [ "$left" -lt "$MIN_STEP_S" ]; then
        STEP_RC=125; STEP_MS=0
        echo "== [$name] not run: global budget spent" >>"$log"
        return 125
    fi
    t=$max; [ "$t" -gt "$left" ] && t=$left
    echo "== [$name] $(date -u +%H:%M:%S) timeout ${t}s: $*" >>"$log"
    t0=$(now_ms)
    timeout -s INT -k 10 "$t" "$@" >>"$log" 2>&1 </dev/null
    STEP_RC=$?
    STEP_MS=$(($(now_ms) - t0))
    echo "== [$name] rc $STEP_RC after $(fmt_s "$STEP_MS")s" >>"$log"
    return $STEP_RC
}

status_of() {   # rc -> status word
    case $1 in 0) echo ok ;; 124|137) echo TIMEOUT ;; 125) echo NOBUDGET ;; *) echo FAIL ;; esac
}

echo "maskdsl GPU kit: mode $MODE${DRY_REASON:+ ($DRY_REASON)}, budget ${BUDGET_S}s"
echo "  python   $PY"
echo "  results  $RES"
echo "  plan     env -> install (+natten, optional) -> tests [${TEST_ARGS[*]}]"
echo "           -> benchmarks/run.py, one case per process ($([ $DRY = 1 ] && echo "triton smoke cases under TRITON_INTERPRET=1; flex/attention skipped" || echo "triton then attention sections, ${CASE_TIMEOUT_S}s each")) -> bench.json"
if [ $DRY = 1 ]; then
    { echo "dry run: $DRY_REASON"; echo "no GPU work was done; timings are not meaningful";
      echo "started $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname 2>/dev/null)"; } >"$RES/DRY_RUN"
fi

# ---------------------------------------------------------------- 1. environment
collect_env() {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  host: $(hostname 2>/dev/null)  nproc: $(nproc 2>/dev/null)"
    echo "uname: $(uname -a)"
    echo "python: $PY"
    if command -v nvidia-smi >/dev/null 2>&1; then
        echo "--- nvidia-smi"
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,compute_cap --format=csv 2>&1
        nvidia-smi 2>&1
    else
        echo "--- nvidia-smi: not found"
    fi
    echo "--- python packages"
    "$PY" - <<'EOF' 2>&1
import importlib, platform, sys
print("python", platform.python_version(), sys.executable)
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn",
          torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
          "cuda_available", torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print("gpu", torch.cuda.get_device_name(0), "cc %d.%d" % (p.major, p.minor),
              "SMs", p.multi_processor_count, "mem_GiB", round(p.total_memory / 2**30, 1))
except Exception as e:
    print("torch: not importable:", e)
for name in ("triton", "natten", "numpy", "sympy", "pytest", "hypothesis", "xdist", "pytest_timeout"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", "?"))
    except Exception as e:
        print(name, "missing", type(e).__name__)
EOF
    echo "--- git"
    if command -v git >/dev/null 2>&1 && git -C "$ROOT" rev-parse HEAD >/dev/null 2>&1; then
        echo "HEAD $(git -C "$ROOT" rev-parse HEAD), $(git -C "$ROOT" status --short | wc -l) changed/untracked paths"
        git -C "$ROOT" status --short | head -40
    else
        echo "no git checkout"
    fi
}
export -f collect_env
run_step env 60 "$RES/env.txt" bash -c collect_env
record "$(status_of $STEP_RC)" "$STEP_RC" "$STEP_MS" env "env.txt"
grep -E "^(torch|triton|natten|gpu) " "$RES/env.txt" | sed 's/^/   /'

# ---------------------------------------------------------------- 2. install
install_deps() {
    local cons=$WORK/constraints.txt missing state pipsrc=() changed=0
    [ -n "$WHEELS" ] && pipsrc=(--no-index --find-links "$WHEELS")
    # one probe, from /tmp so that this checkout does not shadow what is installed: the torch to
    # keep as it is (written as a pip constraint), the missing modules, and whether maskdsl is
    # installed from this checkout
    state=$(cd /tmp && "$PY" - "$ROOT" "$cons" <<'EOF'
import importlib, sys
root, cons = sys.argv[1:]
with open(cons, "w") as f:
    try:
        import torch
        f.write("torch==%s\n" % torch.__version__)       # never reinstall or move torch
    except Exception:
        pass
missing = []
for mod in ("sympy", "numpy", "pytest", "hypothesis", "triton"):
    try:
        importlib.import_module(mod)
    except Exception:
        missing.append(mod)
try:
    import maskdsl, maskdsl.codegen, maskdsl.kernels
    ours = maskdsl.__file__.startswith(root + "/")
except Exception:
    ours = False
print("maskdsl=%s missing=%s" % ("ours" if ours else "no", ",".join(missing)))
EOF
)
    echo "probe: $state"
    missing=$(echo "${state#*missing=}" | tr ',' ' ')
    if [ -n "$missing" ]; then
        if [ "$DRY" = 1 ]; then
            echo "dry run: missing [$missing]; a GPU run would: pip install -c $cons $missing"
            return 1
        fi
        echo "missing: $missing -> pip install"
        changed=1
        "$PY" -m pip install -q --retries 0 --timeout 15 "${pipsrc[@]}" -c "$cons" $missing \
            || echo "pip install $missing failed"
    fi
    case $state in
        maskdsl=ours*) echo "maskdsl: already installed from $ROOT" ;;
        *)  if [ "$DRY" = 1 ]; then
                echo "dry run: maskdsl not installed from $ROOT; a GPU run would: pip install --no-deps --no-build-isolation -e ."
                return 1
            fi
            # editable from this checkout; offline-capable: no deps, no build isolation
            echo "maskdsl: pip install -e ."
            changed=1
            "$PY" -m pip install -q --no-deps --no-build-isolation -e "$ROOT" \
                || "$PY" -m pip install -q --retries 0 --timeout 15 "${pipsrc[@]}" --no-deps -e "$ROOT" ;;
    esac
    "$PY" -m pip --version
    [ $changed = 1 ] || return 0
    (cd /tmp && "$PY" -c "import maskdsl, maskdsl.codegen, maskdsl.kernels, sympy, numpy, pytest, hypothesis, triton; print('imports ok: maskdsl', maskdsl.__version__, 'from', maskdsl.__file__)")
}
install_natten() {
    local cons=$WORK/constraints.txt
    if "$PY" -c "import natten; print('natten', natten.__version__, 'already installed')" 2>/dev/null; then return 0; fi
    if [ "$DRY" = 1 ]; then echo "natten: not installed; dry run makes no install attempt"; return 3; fi
    if [ -n "$WHEELS" ] && ls "$WHEELS"/natten-*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps -c "$cons" "$WHEELS"/natten-*.whl && return 0
    fi
    # PyPI has only NATTEN's source (a CUDA build takes far too long here): binary wheels only
    "$PY" -m pip install -q --retries 0 --timeout 10 --only-binary=:all: --no-deps -c "$cons" natten==0.21.7 \
        && return 0
    echo "natten: no wheel to install; NATTEN rows will be empty"
    return 3
}
export -f install_deps install_natten
run_step install 120 "$RES/install.log" bash -c install_deps
record "$(status_of $STEP_RC)" "$STEP_RC" "$STEP_MS" install "install.log"
run_step natten 45 "$RES/install.log" bash -c install_natten
if [ "$STEP_RC" = 0 ]; then
    record ok 0 "$STEP_MS" "natten (optional)" "$(grep -m1 -o 'natten [0-9][^ ]*' "$RES/install.log" || true)"
else
    record skip "$STEP_RC" "$STEP_MS" "natten (optional)" "not installed: its benchmark columns stay NaN"
fi

# ---------------------------------------------------------------- 3. tests
PYTEST_OPTS=(-p no:cacheprovider -rfE --durations=15 --junitxml="$RES/junit.xml" -o junit_family=xunit2)
if [ $DRY = 0 ]; then
    if "$PY" -c "import xdist" 2>/dev/null; then PYTEST_OPTS+=(-n "${GPU_KIT_TEST_WORKERS:-8}"); fi
    if "$PY" -c "import pytest_timeout" 2>/dev/null; then PYTEST_OPTS+=(--timeout=120); fi
fi
# SIGINT from timeout must reach pytest as KeyboardInterrupt (so junit.xml is still written),
# even where the shell started us with SIGINT ignored
PYTEST_MAIN="import signal, sys, pytest; signal.signal(signal.SIGINT, signal.default_int_handler); sys.exit(pytest.main(sys.argv[1:]))"
run_step tests "$TEST_TIMEOUT_S" "$RES/pytest.log" "$PY" -c "$PYTEST_MAIN" "${PYTEST_OPTS[@]}" "${TEST_ARGS[@]}"
TEST_LINE=$(grep -E "(passed|failed|error|no tests ran|skipped|deselected).* in [0-9.]+s" "$RES/pytest.log" | tail -1 | sed 's/=//g; s/^ *//; s/ *$//')
record "$(status_of $STEP_RC)" "$STEP_RC" "$STEP_MS" tests "${TEST_LINE:-no pytest result line} (pytest.log, junit.xml)"
if [ "$STEP_RC" != 0 ]; then
    sed -n '/short test summary info/,$p' "$RES/pytest.log" | head -30 | sed 's/^/   /'
fi

# ---------------------------------------------------------------- 4. benchmarks
mkdir -p "$WORK/bench"
CASES_FILE=$WORK/cases.list
if [ -n "${GPU_KIT_CASES:-}" ]; then
    echo "$GPU_KIT_CASES" | tr ';' '\n' | sed -n 's/^ *\([a-z]*\):\(.*\)$/\1\t\2/p' >"$CASES_FILE"
else
    timeout 60 "$PY" - "$DRY" >"$CASES_FILE" 2>>"$RES/bench.txt" <<'EOF'
import sys
dry = sys.argv[1] == "1"
sys.argv = ["run.py"]
sys.path.insert(0, "benchmarks")
import run
if dry:
    for c in run.TRITON_SMOKE_CASES:
        print("triton\t" + c[0])
else:
    for c in run.TRITON_CASES:
        print("triton\t" + c[0])
    for c in run.attention_cases(quick=True):
        print("attention\t" + c[0])
EOF
fi
[ -s "$CASES_FILE" ] || record FAIL 1 0 "bench: list cases" "no benchmark cases found (bench.txt)"
QUICK=(--quick); [ "${GPU_KIT_FULL:-0}" = 1 ] && QUICK=()
: >"$WORK/cases.tsv"
i=0; N_BENCH_OK=0
while IFS=$'\t' read -r section name; do
    [ -n "$section" ] || continue
    i=$((i + 1))
    label="bench $section: $name"
    if [ $DRY = 1 ] && [ "$section" != triton ]; then
        record skip - 0 "$label" "dry run"; continue
    fi
    if [ "$(left_s)" -lt "$MIN_STEP_S" ]; then
        record skip - 0 "$label" "global budget spent"
        printf '%s\t%s\t%s\t%s\n' "$section" "$name" skip 0 >>"$WORK/cases.tsv"
        continue
    fi
    out=$WORK/bench/$(printf '%02d' $i)
    if [ $DRY = 1 ]; then
        run_step "$label" "$CASE_TIMEOUT_S" "$RES/bench.txt" env TRITON_INTERPRET=1 \
            "$PY" benchmarks/run.py --only "$section" "${QUICK[@]}" --reps "$REPS" --case "$name" --out "$out"
    else
        run_step "$label" "$CASE_TIMEOUT_S" "$RES/bench.txt" env -u TRITON_INTERPRET \
            "$PY" benchmarks/run.py --only "$section" "${QUICK[@]}" --reps "$REPS" --case "$name" --out "$out"
    fi
    record "$(status_of $STEP_RC)" "$STEP_RC" "$STEP_MS" "$label"
    [ "$STEP_RC" = 0 ] && N_BENCH_OK=$((N_BENCH_OK + 1))
    printf '%s\t%s\t%s\t%s\n' "$section" "$name" "$STEP_RC" "$STEP_MS" >>"$WORK/cases.tsv"
done <"$CASES_FILE"

# merge the per-case JSON files into bench.json and print the GPU rows compactly
merge_bench() {
    "$PY" - "$WORK" "$RES/bench.json" "$MODE" <<'EOF'
import glob, json, math, os, sys
work, dest, mode = sys.argv[1:]
rows, meta = [], None
for path in sorted(glob.glob(os.path.join(work, "bench", "*", "*.json"))):
    with open(path) as f:
        d = json.load(f)
    meta = meta or d["meta"]
    rows += d["rows"]
cases = []
for line in open(os.path.join(work, "cases.tsv")):
    section, name, rc, ms = line.rstrip("\n").split("\t")
    cases.append({"section": section, "case": name, "rc": rc, "seconds": int(ms) / 1000})
meta = dict(meta or {}, kit={"mode": mode, "cases": cases,
                             "command": "bash benchmarks/gpu.sh" + (" --dry-run" if mode != "gpu" else "")})
with open(dest, "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1, default=float)
ms = lambda x: "%9.2f" % (x * 1e3) if isinstance(x, float) and not math.isnan(x) else "      nan"
print("%-44s %-9s %9s %9s %9s %9s %8s %7s %9s %9s" % ("case", "dtype", "triton", "sdpa", "flex",
      "natten", "vs sdpa", "target", "tri f+b", "flex f+b"))
for r in rows:
    if r["section"] == "triton":
        print("%-44s %-9s %s %s %s %s %7.1fx %6.1fx %s %s" % (
            r["case"][:44], r["dtype"][6:], ms(r["triton_fwd_seconds"]), ms(r["sdpa_fwd_seconds"]),
            ms(r["flex_fwd_seconds"]), ms(r["natten_fwd_seconds"]), r["speedup_vs_sdpa"],
            r["target_speedup_vs_sdpa"], ms(r["triton_fwd_bwd_seconds"]), ms(r["flex_fwd_bwd_seconds"])))
    elif r["section"] == "attention":
        print("%-44s %-9s flex %s  sdpa+mask %s  dense %s  natten %s  (ms)" % (
            r["case"][:44], "float32", ms(r["flex_seconds"]), ms(r["sdpa_mask_seconds"]),
            ms(r["sdpa_dense_seconds"]), ms(r["natten_seconds"])))
print("%d rows from %d of %d cases -> %s" % (len(rows), sum(c["rc"] == "0" for c in cases), len(cases), dest))
EOF
}
export -f merge_bench
left=$((BUDGET_S - $(elapsed_s))); [ $left -lt 10 ] && left=10
echo "== [bench: merge]"
t0=$(now_ms)
timeout -k 5 "$left" bash -c merge_bench >"$WORK/merge.out" 2>&1
rc=$?
cat "$WORK/merge.out" >>"$RES/bench.txt"
sed 's/^/   /' "$WORK/merge.out"
if [ $rc = 0 ] && [ $N_BENCH_OK = 0 ]; then
    record FAIL 1 $(($(now_ms) - t0)) "bench: merge" "no benchmark case succeeded"
else
    record "$(status_of $rc)" $rc $(($(now_ms) - t0)) "bench: merge" "bench.json, bench.txt"
fi

# ---------------------------------------------------------------- summary
TOTAL_MS=$(($(now_ms) - START_MS))
EXIT=0; [ $N_FAILED -gt 0 ] && EXIT=1
echo "# total: $N_STEPS steps, $N_FAILED failed, $N_SKIPPED skipped; wall $(fmt_s $TOTAL_MS)s of ${BUDGET_S}s budget; exit $EXIT" >>"$SUMMARY"
echo
cat "$SUMMARY"
echo "results: $RES"
ls -l "$RES" | sed 1d | awk '{print "   " $5 "\t" $NF}'
exit $EXIT
