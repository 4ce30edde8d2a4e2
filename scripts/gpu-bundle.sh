#!/usr/bin/env bash
# Build the release test and example executables, strip them, and put them with a runner
# into .gpu/, to run on a GPU machine that has no Rust toolchain:
#
#   scripts/gpu-bundle.sh            # builds and fills .gpu/
#   (copy .gpu/ to the GPU machine)
#   OUT=/some/dir .gpu/run.sh        # runs everything, writes logs under $OUT
#
# The runner runs every test binary with --ignored (the CUDA half of each suite) and every
# example that reports figures, with GPUSHARE_DEVICE=cuda so nothing falls back silently.
set -euo pipefail
shopt -s nullglob
cd "$(dirname "$0")/.."

for tool in cargo python3 strip; do
  command -v "$tool" > /dev/null || { echo "gpu-bundle: $tool is needed and not on PATH" >&2; exit 1; }
done
target=${CARGO_TARGET_DIR:-target}

# Examples that print figures; each runs on the GPU with its default flags.
FIGURE_EXAMPLES=(gpu_report device_probe pool_device pool_bench eviction_stall isolation llm_tts_vision)

out=.gpu
rm -rf "$out"
mkdir -p "$out/tests" "$out/examples" "$out/benches"

# The compiler artifacts of a `--no-run` build that are test harnesses (tests or benches).
harnesses() {
  python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("profile", {}).get("test") and m.get("executable"):
        print(m["executable"])
'
}

echo "building release tests and examples..." >&2
cargo build --release --workspace --examples
# Cargo's progress and errors go to a log, shown if the build fails.
log=$out/.cargo.log
cargo test --release --workspace --no-run --message-format=json 2> "$log" | harnesses > "$out/.test-list" \
  || { cat "$log" >&2; echo "gpu-bundle: building the tests failed" >&2; exit 1; }
# Criterion benches: the same harnesses `cargo bench` runs, started with --bench.
cargo bench --workspace --no-run --message-format=json 2> "$log" | harnesses > "$out/.bench-list" \
  || { cat "$log" >&2; echo "gpu-bundle: building the benches failed" >&2; exit 1; }
rm "$log"
grep '/deps/\(pool\|runtime\)-' "$out/.bench-list" > "$out/.benches" \
  || { echo "gpu-bundle: the pool and runtime benches were not built" >&2; exit 1; }
mv "$out/.benches" "$out/.bench-list"
while read -r exe; do
  cp "$exe" "$out/benches/$(basename "$exe")"
done < "$out/.bench-list"
rm "$out/.bench-list"

while read -r exe; do
  name=$(basename "$exe")
  # Cargo's names, hash suffix included (name-0123abcd): they stay unique.
  cp "$exe" "$out/tests/$name"
done < "$out/.test-list"
[ -n "$(ls "$out/tests")" ] || { echo "gpu-bundle: no test harness was built" >&2; exit 1; }
rm "$out/.test-list"

for ex in "${FIGURE_EXAMPLES[@]}"; do
  cp "$target/release/examples/$ex" "$out/examples/$ex"
done

strip "$out"/tests/* "$out"/examples/* "$out"/benches/*

cat > "$out/run.sh" <<'RUN'
#!/usr/bin/env bash
# Runs the bundled tests (--ignored: the CUDA suites) and figure examples on a GPU machine.
# Logs go to $OUT/results.tar.gz (default ./gpu-out; results-2.tar.gz, ... for later runs). Exits non-zero if anything failed or timed out.
#   ONLY="tests"                 only the test binaries
#   ONLY="examples"              only the figure examples
#   ONLY="gpu_report isolation"  only the named binaries (tests or examples)
#   ONLY="tests/runtime"         a name with its kind, where a test and an example share it
#   ONLY="benches"               only the criterion benches (not run unless named so, or
#                                as "benches/runtime"; a plain name never runs a bench)
#   TEST_TIMEOUT / EXAMPLE_TIMEOUT / BENCH_TIMEOUT  seconds per binary (default 120 / 150 / 300)
#   EXAMPLE_ARGS_<name>          extra flags for one example, e.g. EXAMPLE_ARGS_pool_bench=--quick
#   BENCH_ARGS                   criterion flags (default: 1 s warm-up, 2 s measurement, no plots)
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# Everything is written under $OUT/results and packed into $OUT/results.tar.gz at the end (or
# results-2.tar.gz, ... if that exists; a remote runner may bring back only a few files).
FINAL=${OUT:-$PWD/gpu-out}
OUT=$FINAL/results
ONLY=${ONLY:-}
TEST_TIMEOUT=${TEST_TIMEOUT:-120}
EXAMPLE_TIMEOUT=${EXAMPLE_TIMEOUT:-150}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-300}
BENCH_ARGS=${BENCH_ARGS:---warm-up-time 1 --measurement-time 2 --noplot}
# Logs a run killed before packing them left behind are not this run's.
rm -rf "$OUT"
mkdir -p "$OUT/tests" "$OUT/examples" "$OUT/benches"
export GPUSHARE_DEVICE=cuda
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
wanted() { # kind name
  [ -z "$ONLY" ] && return 0
  for w in $ONLY; do
    if [ "$w" = "$1" ] || [ "$w" = "$2" ] || [ "${2%-*}" = "$w" ] || [ "$w" = "$1/${2%-*}" ]; then return 0; fi
  done
  return 1
}
bench_wanted() { # name: only "benches" or "benches/<name>" runs a bench
  for w in $ONLY; do
    if [ "$w" = benches ] || [ "$w" = "benches/${1%-*}" ]; then return 0; fi
  done
  return 1
}
failed=0
for t in "$here"/tests/*; do
  n=$(basename "$t")
  wanted tests "$n" || continue
  echo "== test $n" >&2
  start=$SECONDS
  timeout "$TEST_TIMEOUT" "$t" --ignored --test-threads=1 > "$OUT/tests/$n.txt" 2>&1
  rc=$?
  if [ $rc -ne 0 ]; then
    echo "   FAILED rc=$rc after $((SECONDS - start)) s (see tests/$n.txt)" >&2
    failed=1
  fi
  grep -E "^test result" "$OUT/tests/$n.txt" >&2 || true
done
for e in "$here"/examples/*; do
  n=$(basename "$e")
  wanted examples "$n" || continue
  echo "== example $n" >&2
  var="EXAMPLE_ARGS_$n"
  start=$SECONDS
  # shellcheck disable=SC2086
  timeout "$EXAMPLE_TIMEOUT" "$e" ${!var:-} > "$OUT/examples/$n.md" 2> "$OUT/examples/$n.log"
  rc=$?
  echo "   rc=$rc in $((SECONDS - start)) s" >&2
  [ $rc -ne 0 ] && failed=1
done
# Benches take minutes: they run only when ONLY names them ("benches", or "benches/<name>").
for b in "$here"/benches/*; do
  [ -e "$b" ] || continue
  n=$(basename "$b")
  bench_wanted "$n" || continue
  echo "== bench $n" >&2
  start=$SECONDS
  # shellcheck disable=SC2086
  timeout "$BENCH_TIMEOUT" "$b" --bench $BENCH_ARGS > "$OUT/benches/$n.txt" 2>&1
  rc=$?
  echo "   rc=$rc in $((SECONDS - start)) s" >&2
  [ $rc -ne 0 ] && failed=1
done
# A second run into the same $OUT keeps the first one's results: results-2.tar.gz, ...
tarball=$FINAL/results.tar.gz
n=1
while [ -e "$tarball" ]; do
  n=$((n + 1))
  tarball=$FINAL/results-$n.tar.gz
done
if tar czf "$tarball" -C "$FINAL" results; then
  rm -rf "$OUT"
else
  echo "packing the results failed; they are in $OUT" >&2
  failed=1
fi
echo "results in $tarball" >&2
exit $failed
RUN
chmod +x "$out/run.sh"
du -sh "$out" >&2
size=$(du -sm "$out" | cut -f1)
if [ "$size" -ge 64 ]; then
  echo "gpu-bundle: .gpu is ${size} MiB; remote runners carry at most 64 MiB: bundle fewer binaries" >&2
  exit 1
fi
