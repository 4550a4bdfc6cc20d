#!/usr/bin/env bash
# Prepare, here, what bench/gpu_check.sh needs on the lent GPU machine, which is offline and receives at most 64 MiB
# of working tree: writes bench/.gpu/ (git-ignored through .git/info/exclude; name it in the device call's carry):
#   llama.cpp-<version>.tar.gz  the llama.cpp that the installed llama-cpp-python vendors, trimmed to what a
#                               llama-server build reads (the 76 MB sdist and its docs, models and tests stay here)
#   site/gguf/                  the gguf package (pure Python) the architecture twins are written with; the GPU
#                               machine's python has numpy, psutil, nvidia-ml-py and aiohttp but not gguf
#   llama-server-cpu            this machine's CPU llama-server, for the CPU-build warning on the GPU machine
# Needs .venv (scripts/setup.sh); the sdist is fetched once, as `hybridd engines build` does.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUTDIR=bench/.gpu
exclude_file="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude_file")"
for pattern in /bench/.gpu/ /bench/.gpu-build/; do
    grep -qxF "$pattern" "$exclude_file" 2>/dev/null || echo "$pattern" >>"$exclude_file"
done

version="$("$PY" -c 'from hybridd.engine import build; print(build.installed_version() or "")')"
[ -n "$version" ] || { echo "gpu_prepare: llama-cpp-python is not installed in .venv" >&2; exit 1; }
source_dir="$("$PY" - "$version" <<'EOF'
import os, sys
from hybridd.engine import build
root = build.cache_root(os.environ)
print(build.fetch_source(root, sys.argv[1], sys.executable, build.Reporter(sys.stderr)))
EOF
)"
mkdir -p "$OUTDIR/site"
rm -f "$OUTDIR"/llama.cpp-*.tar.gz
# Left out: what no llama-server build reads (docs, models, media, tests, examples, the web UI's sources, CI), and
# the ggml backends other than CPU and CUDA.
tar -czf "$OUTDIR/llama.cpp-$version.tar.gz" -C "$(dirname "$source_dir")" \
    --exclude='llama.cpp/docs' --exclude='llama.cpp/models' --exclude='llama.cpp/media' \
    --exclude='llama.cpp/benches' --exclude='llama.cpp/tests' --exclude='llama.cpp/examples' \
    --exclude='llama.cpp/pocs' --exclude='llama.cpp/.github' --exclude='llama.cpp/.devops' --exclude='llama.cpp/ci' \
    --exclude='llama.cpp/gguf-py' --exclude='llama.cpp/conversion' --exclude='llama.cpp/skills' \
    --exclude='llama.cpp/requirements' --exclude='llama.cpp/scripts/[!u]*' --exclude='llama.cpp/app' \
    --exclude='llama.cpp/tools/ui/src' --exclude='llama.cpp/tools/ui/tests' \
    --exclude='llama.cpp/tools/ui/package-lock.json' --exclude='llama.cpp/tools/server/tests' \
    --exclude='llama.cpp/tools/server/bench' --exclude='llama.cpp/tools/server/public*' \
    --exclude='llama.cpp/ggml/src/ggml-vulkan' --exclude='llama.cpp/ggml/src/ggml-sycl' \
    --exclude='llama.cpp/ggml/src/ggml-opencl' --exclude='llama.cpp/ggml/src/ggml-hexagon' \
    --exclude='llama.cpp/ggml/src/ggml-metal' --exclude='llama.cpp/ggml/src/ggml-cann' \
    --exclude='llama.cpp/ggml/src/ggml-webgpu' --exclude='llama.cpp/ggml/src/ggml-openvino' \
    --exclude='llama.cpp/ggml/src/ggml-et' --exclude='llama.cpp/ggml/src/ggml-virtgpu' \
    --exclude='*.pyc' --exclude='__pycache__' \
    "$(basename "$source_dir")"
gguf_dir="$("$PY" -c 'import gguf, os; print(os.path.dirname(gguf.__file__))')"
rm -rf "$OUTDIR/site/gguf"
cp -r "$gguf_dir" "$OUTDIR/site/gguf"
find "$OUTDIR/site" -name __pycache__ -type d -prune -exec rm -rf {} +
cpu_binary="$("$PY" -c '
import os
from hybridd.engine import build
found = [b for b in build.built_binaries(build.cache_root(os.environ), build.installed_version() or "")
         if "-cpu/" in str(b)]
print(found[0] if found else "")')"
rm -f "$OUTDIR/llama-server-cpu.gz"
if [ -n "$cpu_binary" ]; then
    gzip -c "$cpu_binary" >"$OUTDIR/llama-server-cpu.gz"
else
    echo "gpu_prepare: no CPU llama-server built here (scripts/build_engines.sh): the GPU machine shows the" \
         "CPU-build warning with its CUDA build hidden from the GPU instead" >&2
fi
echo "$version" >"$OUTDIR/version"
carried="$(du -sb "$OUTDIR" | cut -f1)"
tree="$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -n 1 | cut -f1)"
untracked="$(git ls-files -z --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null | tail -n 1 | cut -f1)"
total=$((carried + tree + ${untracked:-0}))
printf 'gpu_prepare: %s holds %.1f MiB (llama.cpp %s trimmed: %.1f MiB); with the working tree %.1f MiB of 64\n' \
    "$OUTDIR" "$(echo "$carried / 1048576" | bc -l)" "$version" \
    "$(echo "$(stat -c %s "$OUTDIR/llama.cpp-$version.tar.gz") / 1048576" | bc -l)" \
    "$(echo "$total / 1048576" | bc -l)"
if [ "$total" -gt $((64 * 1048576)) ]; then
    echo "gpu_prepare: over the device tool's 64 MiB: the call would be refused" >&2
    exit 1
fi
