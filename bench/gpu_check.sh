#!/usr/bin/env bash
# The checks that need a GPU (issue 17 item 4, issue 15 item 6), in one run that fits the device tool's 10-minute
# command on its lent H100/H200 (sm_90, offline, 16 cores): a CUDA llama-server for that GPU's architecture only,
# the real NVML probe, full-size architecture twins loaded wholly on the GPU at several contexts with memory (NVML,
# per process) and decode speed at several depths next to the plan's predictions, and the CPU-build warning.
# Writes bench/results/gpu_check-<gpu>.json (and copies it, with the logs' tails, to $OUT for the device tool).
#
#   here, once:      bench/gpu_prepare.sh                      (the trimmed llama.cpp and gguf into bench/.gpu/)
#   on the GPU:      run(command="bench/gpu_check.sh", carry=["bench/.gpu"], timeout_s=600)
#   here, dry:       bench/gpu_check.sh --dry-run              (CPU: no compile, shrunken twins; proves the plumbing)
#
# The CUDA build is most of the time: 351 steps, 144 of them CUDA sources for one architecture, 320 s on the lent
# H200's 16 cores (measured 2026-11-27). GPU_CHECK_BUDGET_S (default 570) is this run's time; the build gets what
# the measurements do not need (GPU_CHECK_MEASURE_S, default 150). GPU_CHECK_SWEEP=1: decode at five depths,
# twice each, at one context per twin (SWEEP_TWINS). The build tree stays in bench/.gpu-build/ (ignored, not
# carried): if the build runs out of time, the run still records the NVML probe and the CPU-build warning and
# prints the command to call again at once, while the machine is still warm (30 s), which resumes the build where
# ninja stopped and then measures.
set -uo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
dry=0
[ "${1:-}" = --dry-run ] && dry=1
budget="${GPU_CHECK_BUDGET_S:-570}"
measure_s="${GPU_CHECK_MEASURE_S:-150}"
work="$PWD/bench/.gpu-build"
mkdir -p "$work" bench/results
# The device's python3 has numpy, psutil, nvidia-ml-py and aiohttp; gguf comes carried. Here, .venv's python.
if [ -z "${PYTHON:-}" ]; then
    if [ "$dry" = 1 ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD/bench/.gpu/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if [ ! -f bench/.gpu/version ]; then
    echo "gpu_check: bench/.gpu is missing: run bench/gpu_prepare.sh on the CPU machine and carry bench/.gpu" >&2
    exit 2
fi
elapsed() { echo $(( $(date +%s) - started )); }

echo "gpu_check: $(date -u +%FT%TZ) on $(hostname), python $("$PYTHON" -c 'import sys; print(sys.version.split()[0])')"
if [ "$dry" = 1 ]; then
    name=dryrun
    # As on the GPU machine, whose python has none of these: what needs them fails here too.
    export GPU_CHECK_BLOCK_IMPORTS="zeroconf,cryptography,spake2,llama_cpp"
    "$PYTHON" bench/gpu_check.py build --work "$work" --dry-run --archs 90
else
    # The architectures setup.sh would choose here (scripts/detect_gpus.py), sm_90 on the lent Hopper.
    archs="$("$PYTHON" -S scripts/detect_gpus.py --shell 2>/dev/null | sed -n "s/^HYBRIDD_CUDA_ARCHS=//p" | tr -d "'")"
    archs="${archs:-90}"
    name="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | tr -c 'A-Za-z0-9.\n-' '-' \
            | tr -s '-' | sed 's/-$//')"
    name="${name:-unknown-gpu}"
    build_s=$(( budget - measure_s - $(elapsed) ))
    echo "gpu_check: building llama-server for CUDA sm_$archs with $(nproc) jobs, at most $build_s s"
    # timeout ends the whole process group (cmake, ninja, nvcc) if the build overruns; a warm rerun resumes it.
    rm -f "$work/build.json"
    timeout --kill-after=10 "$build_s" "$PYTHON" bench/gpu_check.py build --work "$work" --cuda --archs "$archs" \
        --jobs "$(nproc)" 2>&1 | tee "$work/build.log"
    if [ ! -f "$work/build.json" ]; then  # ended by timeout: the build step wrote nothing
        echo "{\"error\": \"the CUDA build did not finish in $build_s s; call again while the machine is warm\"," \
             "\"log_tail\": $(tail -n 15 "$work/build.log" | "$PYTHON" -c 'import json,sys; print(json.dumps(sys.stdin.read().splitlines()))')}" \
            >"$work/build.json"
    fi
fi
sweep=()
[ "${GPU_CHECK_SWEEP:-0}" != 0 ] && sweep=(--sweep) && name="$name-sweep"
results="bench/results/gpu_check-$name.json"
left=$(( budget - $(elapsed) - 10 ))
if [ "$dry" = 1 ]; then
    "$PYTHON" bench/gpu_check.py measure --work "$work" --dry-run --results "$results" --budget-s "$left" \
        --n-predict 8 --reserve-s 5 "${sweep[@]}"
else
    twins=/dev/shm/gpu-check-twins  # 128 GiB of RAM there: tmpfs writes the twins at memory speed
    mkdir -p "$twins" 2>/dev/null || twins="$work/twins"
    "$PYTHON" bench/gpu_check.py measure --work "$work" --results "$results" --budget-s "$left" --twin-dir "$twins" \
        "${sweep[@]}"
fi
status=$?
if [ -n "${OUT:-}" ]; then
    tail -n 60 "$work/build.log" >"$OUT/build-tail.log" 2>/dev/null || true
    tar -czf "$OUT/logs.tar.gz" -C "$work" logs 2>/dev/null || true
fi
echo "gpu_check: done in $(elapsed) s (exit $status); results in $results"
if [ "$dry" = 0 ] && grep -q 'did not finish' "$work/build.json" 2>/dev/null; then
    echo "gpu_check: the build ran out of time: call again within 30 s (the machine stays warm that long) to resume" \
         "it and measure, with the device seconds left, e.g." \
         "run(command=\"GPU_CHECK_BUDGET_S=240 GPU_CHECK_MEASURE_S=150 bench/gpu_check.sh\", carry=[\"bench/.gpu\"])"
fi
exit "$status"
