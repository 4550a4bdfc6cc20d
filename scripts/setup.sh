#!/usr/bin/env bash
# Make .venv with hybridd installed, its engines built for this machine's GPUs (CUDA) or its CPU.
#   scripts/setup.sh               what serving needs, the llama-server engine and the demo model (scripts/serve.sh)
#   scripts/setup.sh test          also the test tools, the training and tray extras, and the desktop tests'
#                                  programs (Chromium, Xvfb, a tray host: scripts/install_desktop.sh) (scripts/test.sh)
#   scripts/setup.sh --print-plan  (with or without test) what it would build and run, and why; changes nothing
# Before installing anything, scripts/detect_gpus.py (system python, standard library only) asks nvidia-smi for the
# GPUs and their architectures and looks for nvcc: GPUs and a toolkit new enough for them -> llama-cpp-python (and
# llama-server, where one is built) compiled with CUDA for exactly those architectures; GPUs without a toolkit -> CPU
# builds, the command that installs the toolkit, and the daemon warns; no GPU -> CPU builds, as before.
# HYBRIDD_BUILD=cpu|cuda|auto overrides the choice, HYBRIDD_CUDA_ARCHS="89;120" the architectures.
# The tests train on the CPU, so their torch is pinned to the CPU build: a plain requirement would pull a CUDA build
# of several GB (a user's `pip install 'hybridd[train]'` keeps the plain range). llama-server is compiled once from
# the llama.cpp that llama-cpp-python vendors and cached under $XDG_CACHE_HOME/hybridd/engines (about 7 minutes on
# 2 cores the first time for the CPU, instant afterwards). A CUDA llama-cpp-python is compiled from source with
# pip's cache bypassed (a cached CPU wheel would otherwise come back): 10-30 minutes, once; a rerun checks
# llama_supports_gpu_offload() and the architectures it was built for, and skips it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
mode=serve
dry=0
for arg in "$@"; do
    case "$arg" in
        test) mode=test ;;
        --print-plan) dry=1 ;;
        *) echo "usage: scripts/setup.sh [test] [--print-plan]" >&2; exit 2 ;;
    esac
done

# The choice, as HYBRIDD_BUILD_CHOICE / HYBRIDD_CUDA_ARCHS / HYBRIDD_CMAKE_ARGS / HYBRIDD_NVCC / HYBRIDD_GPU_COUNT;
# the reasons go to the terminal.
choice="$("$PYTHON" scripts/detect_gpus.py --shell)" || exit $?  # a bad HYBRIDD_BUILD or HYBRIDD_CUDA_ARCHS: its message
eval "$choice"
VENV_PY=.venv/bin/python
# Which llama-cpp-python build the venv holds: written after a source build, compared on the next run.
MARKER=.venv/hybridd-llama-cpp-python.build
# The requirement as pyproject.toml states it, e.g. llama-cpp-python[server]>=0.3.16.
LLAMA_REQ="$(sed -n 's/^ *"\(llama-cpp-python\[server\][^"]*\)",*$/\1/p' pyproject.toml | head -n 1)"
LLAMA_REQ="${LLAMA_REQ:-llama-cpp-python[server]}"

show() {  # a command as one shell-quoted line
    local out="" word
    for word in "$@"; do
        if [[ "$word" =~ ^[A-Za-z0-9_./=:+,@%-]+$ ]]; then out+="$word "; else out+="'${word//\'/\'\\\'\'}' "; fi
    done
    printf '%s\n' "${out% }"
}
step() {  # run a command, or with --print-plan show it
    if [ "$dry" = 1 ]; then printf '  would run: %s\n' "$(show "$@")"; else "$@"; fi
}
llama_version() {
    [ -x "$VENV_PY" ] || return 0
    "$VENV_PY" -c 'import importlib.metadata as m
try: print(m.version("llama-cpp-python"))
except m.PackageNotFoundError: pass' 2>/dev/null || true
}
gpu_offload() {  # True, False, or nothing when llama_cpp cannot be imported
    [ -x "$VENV_PY" ] || return 0
    "$VENV_PY" -c 'import llama_cpp; print(bool(llama_cpp.llama_supports_gpu_offload()))' 2>/dev/null | tail -n 1 || true
}
cuda_env=(env "CMAKE_ARGS=$HYBRIDD_CMAKE_ARGS" "CMAKE_BUILD_PARALLEL_LEVEL=$(nproc 2>/dev/null || echo 2)")
if [ -n "$HYBRIDD_NVCC" ]; then
    cuda_env+=("CUDACXX=$HYBRIDD_NVCC")  # cmake finds nvcc on PATH only; the toolkit often sits in /usr/local/cuda
fi
source_build=(--no-cache-dir --no-binary llama-cpp-python)

if [ "$dry" = 1 ]; then
    echo "setup plan ($mode): $HYBRIDD_BUILD_CHOICE build${HYBRIDD_CUDA_ARCHS:+ for CUDA architectures $HYBRIDD_CUDA_ARCHS}"
fi
if [ ! -x "$VENV_PY" ]; then
    step "$PYTHON" -m venv .venv
fi
step "$VENV_PY" -m pip install --quiet --upgrade pip

version="$(llama_version)"
if [ "$HYBRIDD_BUILD_CHOICE" = cuda ] && [ -z "$version" ]; then
    # First install on a GPU box: compile llama-cpp-python for CUDA straight away rather than a CPU build first.
    echo "setup: compiling llama-cpp-python for CUDA ($HYBRIDD_CMAKE_ARGS): 10-30 minutes, once"
    step "${cuda_env[@]}" "$VENV_PY" -m pip install "${source_build[@]}" "$LLAMA_REQ"
fi
if [ "$mode" = test ]; then
    # The desktop tests' programs (Chromium, Xvfb, a tray host) and what PyGObject (the tray extra) compiles
    # against, from apt: at once when they are here.
    # Outside CI a machine that cannot install them still gets the rest: those tests skip there and say why.
    extras=dev,train,tray
    if ! step scripts/install_desktop.sh; then
        if [ -n "${CI:-}" ]; then exit 1; fi
        echo "setup: WARNING: the desktop tests' programs are missing (above): the dashboard and tray tests will" \
             "skip, and the tray extra is not installed" >&2
        extras=dev,train
    fi
    # PyGObject 3.51 and later need girepository-2.0 (GLib 2.80); Debian 12 and Ubuntu 22.04 have the 1.0 one.
    pygobject=()
    if [ "$extras" = dev,train,tray ] && ! pkg-config --exists girepository-2.0 2>/dev/null; then
        pygobject=('PyGObject<3.51')
    fi
    step "$VENV_PY" -m pip install --quiet 'torch==2.13.0+cpu' "${pygobject[@]}" -e ".[$extras]"
else
    step "$VENV_PY" -m pip install --quiet -e '.[demo]'
fi

version="$(llama_version)"
wanted="$HYBRIDD_BUILD_CHOICE $HYBRIDD_CMAKE_ARGS"
if [ "$HYBRIDD_BUILD_CHOICE" = cuda ]; then
    offload="$(gpu_offload)"
    built="$(cat "$MARKER" 2>/dev/null || true)"
    # A GPU build for these architectures is kept; one made by hand (no marker) is kept too, as it offloads.
    if [ "$offload" = True ] && { [ -z "$built" ] || [ "$built" = "${version:-?} $wanted" ]; }; then
        echo "setup: llama-cpp-python ${version:-} already offloads to the GPU: kept"
    else
        echo "setup: rebuilding llama-cpp-python ${version:-(the version pip installed)} for CUDA" \
             "($HYBRIDD_CMAKE_ARGS), bypassing pip's cached CPU wheel: 10-30 minutes, once"
        step "${cuda_env[@]}" "$VENV_PY" -m pip install "${source_build[@]}" --force-reinstall --no-deps \
            "llama-cpp-python==${version:-<installed version>}"
        if [ "$dry" = 0 ]; then echo "${version} $wanted" >"$MARKER"; fi
    fi
elif [ "${HYBRIDD_BUILD:-auto}" = cpu ] && [ "$(gpu_offload)" = True ]; then
    echo "setup: HYBRIDD_BUILD=cpu: rebuilding llama-cpp-python ${version} for the CPU"
    step env "CMAKE_ARGS=$HYBRIDD_CMAKE_ARGS" "$VENV_PY" -m pip install "${source_build[@]}" --force-reinstall \
        --no-deps "llama-cpp-python==${version}"
    if [ "$dry" = 0 ]; then echo "${version} $wanted" >"$MARKER"; fi
fi

if [ "$dry" = 1 ]; then
    echo "  would check: llama_cpp.llama_supports_gpu_offload() is $([ "$HYBRIDD_BUILD_CHOICE" = cuda ] && echo True || echo False)"
else
    offload="$(gpu_offload)"
    if [ "$offload" = True ]; then
        echo "setup: llama-cpp-python ${version}: llama_supports_gpu_offload() = True (CUDA build)"
    elif [ "$offload" = False ]; then
        echo "setup: llama-cpp-python ${version}: llama_supports_gpu_offload() = False (CPU build)"
        if [ "$HYBRIDD_BUILD_CHOICE" = cuda ]; then
            echo "setup: WARNING: the CUDA build of llama-cpp-python does not offload to the GPU; see the pip output" \
                 "above. hybridd will warn and plan this node as CPU-only until it does" >&2
        fi
    else
        echo "setup: WARNING: llama_cpp cannot be imported from .venv" >&2
    fi
fi

# llama-server, the engine agents need (tool calls, json_schema, parallel slots): built once per version and backend
# (a cached build is found at once) and, where one is, the default engine of models that name none.
# HYBRIDD_LLAMA_SERVER=0 skips it when serving: models then run on llama-cpp-python. The tests always build it.
# A CUDA build is for the architectures chosen above (HYBRIDD_CUDA_ARCHS, or the GPUs'), passed on explicitly: the
# eval'd variable is not exported. None chosen: the build asks nvidia-smi itself.
server_flags=("--$HYBRIDD_BUILD_CHOICE")
if [ "$HYBRIDD_BUILD_CHOICE" = cuda ] && [ -n "$HYBRIDD_CUDA_ARCHS" ]; then
    server_flags+=(--cuda-archs "$HYBRIDD_CUDA_ARCHS")
fi
engines=("$VENV_PY" -m hybridd.cli.engines)
if [ "$mode" = test ] || [ "${HYBRIDD_LLAMA_SERVER:-1}" != 0 ]; then
    step "${engines[@]}" build llama-server "${server_flags[@]}" ${JOBS:+--jobs "$JOBS"}
fi
