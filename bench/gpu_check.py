"""The GPU checks the suite cannot run on a CPU machine (issue 17 item 4, issue 15 item 6); bench/gpu_check.sh runs it.

    build    llama-server from the carried, trimmed llama.cpp (bench/gpu_prepare.sh), through hybridd's own build
             code (hybridd.engine.build), for the GPU's architecture only; --dry-run reuses this machine's CPU build
             and only configures a CUDA build of the trimmed source (nvcc compiles nothing)
    measure  the real NVML probe; full-size architecture twins (bench/gpu_check_twins.py) loaded entirely on the GPU
             by llama-server with the command line hybridd gives it, at several contexts: memory per process (NVML)
             and as llama.cpp logs its buffers, decode speed at several depths (llama-server's /completion
             timings), each next to the plan's prediction for the GPU's hardware profile; the CPU-build warning
             (hybridd.probe.engine_builds) for a CPU llama-server on the same box

Everything goes into one JSON (bench/results/gpu_check-<gpu>.json, and $OUT where the device tool collects files),
rewritten after every step, so a run cut short still leaves what it measured. A step that fails is recorded with
its reason and the run goes on. Time is budgeted: a step that would not fit before --deadline is skipped and named.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib
import importlib.abc
import json
import os
import platform
import random
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))


class _Absent(importlib.abc.MetaPathFinder):
    """Makes the modules GPU_CHECK_BLOCK_IMPORTS names unimportable: the dry run then has the GPU machine's gaps."""

    def __init__(self, names: set[str]) -> None:
        self.names = names

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name.split(".")[0] in self.names:
            raise ImportError(f"{name} is not installed on the GPU machine (GPU_CHECK_BLOCK_IMPORTS)")
        return None


if os.environ.get("GPU_CHECK_BLOCK_IMPORTS"):
    sys.meta_path.insert(0, _Absent(set(os.environ["GPU_CHECK_BLOCK_IMPORTS"].split(","))))

GIB = 1024**3
MIB = 1024**2
PROFILE_BY_GPU = (("H100", "h100-sxm"), ("H200", "h200-sxm"), ("RTX PRO 6000", "rtx-pro-6000"), ("GB10", "dgx-spark"))
DEFAULT_PROFILE = "h100-sxm"
LOAD_TIMEOUT_S = 180.0
_BUFFER = re.compile(r"(\S+)\s+(model|KV|compute|output|RS)\s+buffer size =\s*([\d.]+) MiB")


@dataclass(frozen=True)
class Twin:
    """One model to measure: a model profile's shapes in a quant scheme, at contexts, with depths at the largest."""

    profile: str
    scheme: str
    contexts: tuple[int, ...]
    depths: tuple[int, ...]
    optional: bool = False  # measured only when the budget has room


# Most informative first: a budget cut short still leaves a dense model at several contexts and depths, then the
# two MoE shapes whose decode falls with depth at different rates (GLM-4.7-Flash's MLA reads a 576-wide latent for 20
# query heads per layer, Qwen3-Coder's GQA 4 KV heads of 128 for 32), then a second dense size and quant type.
DEVICE_TWINS = (
    Twin("llama-3.2-3b", "Q8_0", (4096, 32768, 131072), (0, 4096, 16384, 32768)),
    Twin("glm-4.7-flash", "Q4_K_M", (4096, 36864), (0, 8192, 16384, 32768)),
    Twin("qwen3-coder-30b-a3b", "Q4_K_M", (4096, 36864), (0, 16384, 32768)),
    Twin("llama-3.1-8b", "Q4_K_M", (4096, 65536), (0, 8192, 32768), optional=True),
    Twin("llama-3.2-3b", "Q4_K_M", (4096, 32768), (0, 8192), optional=True),
)
# --sweep: decode at many depths, each repeated, one context per twin; the MLA and GQA MoEs first.
SWEEP_TWINS = (
    Twin("glm-4.7-flash", "Q4_K_M", (36864,), (0, 2048, 8192, 16384, 32768)),
    Twin("llama-3.2-3b", "Q8_0", (36864,), (0, 2048, 8192, 16384, 32768)),
    Twin("qwen3-coder-30b-a3b", "Q4_K_M", (36864,), (0, 2048, 8192, 16384, 32768)),
    Twin("llama-3.1-8b", "Q4_K_M", (36864,), (0, 2048, 8192, 16384, 32768)),
)
SWEEP_REPEATS = 2
# The dry run's CPU-sized stand-ins: the same architectures cut to DRY_LAYERS layers and a DRY_VOCAB vocabulary.
DRY_TWINS = (
    Twin("llama-3.2-3b", "Q8_0", (1024, 4096), (0, 512)),
    Twin("llama-3.1-8b", "Q4_K_M", (1024,), (0,)),
    Twin("glm-4.7-flash", "Q4_K_M", (1024,), (0, 256)),
)
DRY_LAYERS, DRY_VOCAB = 2, 32000


# ---- the results file -------------------------------------------------------------------------------------------


class _Tail:
    """A stream that writes through to stdout and keeps the last lines, for a failed build's record."""

    def __init__(self, keep: int = 25) -> None:
        self.keep = keep
        self.lines: list[str] = []

    def write(self, text: str) -> int:
        sys.stdout.write(text)
        self.lines.extend(line for line in text.splitlines() if line.strip())
        del self.lines[:-self.keep]
        return len(text)

    def flush(self) -> None:
        sys.stdout.flush()

    def isatty(self) -> bool:
        return False


class Results:
    """The JSON being built, written again after every change."""

    def __init__(self, paths: list[Path], started: float) -> None:
        self.paths = paths
        self.started = started
        self.body: dict[str, Any] = {"schema": 1, "errors": [], "skipped": []}

    def set(self, key: str, value: Any) -> None:
        self.body[key] = value
        self.save()

    def error(self, step: str, exc: BaseException | str) -> None:
        text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        print(f"gpu_check: {step}: {text}", flush=True)
        self.body["errors"].append({"step": step, "error": text})
        self.save()

    def skip(self, what: str, why: str) -> None:
        print(f"gpu_check: skipped {what}: {why}", flush=True)
        self.body["skipped"].append({"what": what, "why": why})
        self.save()

    def save(self) -> None:
        self.body["elapsed_s"] = round(time.monotonic() - self.started, 1)
        text = json.dumps(self.body, indent=2, default=str) + "\n"
        for path in self.paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            staged = path.with_name(path.name + ".tmp")
            staged.write_text(text)
            os.replace(staged, path)


# ---- environment and probe ----------------------------------------------------------------------------------------


def _run_text(argv: list[str], timeout: float = 30.0) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run {argv[0]}: {exc}"
    return (done.stdout + done.stderr).strip()


def environment() -> dict[str, Any]:
    """What this machine offers the check: Python modules, drivers, compilers."""
    modules = {}
    for name in ("numpy", "gguf", "psutil", "pynvml", "aiohttp", "msgpack", "zeroconf", "cryptography", "llama_cpp"):
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # a module broken inside is as absent as a missing one here
            modules[name] = f"missing ({type(exc).__name__})"
        else:
            where = str(Path(getattr(module, "__file__", "") or "").parent)
            modules[name] = f"{getattr(module, '__version__', 'present')} ({where})"
    return {
        "python": sys.version.split()[0],
        "python_path": sys.executable,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "modules": modules,
        "nvidia_smi": _run_text(["nvidia-smi", "--query-gpu=name,compute_cap,memory.total,driver_version",
                                 "--format=csv,noheader"]) if shutil.which("nvidia-smi") else "no nvidia-smi",
        "nvcc": _run_text(["nvcc", "--version"]).splitlines()[-2:] if shutil.which("nvcc") else "no nvcc on PATH",
        "cmake": _run_text(["cmake", "--version"]).splitlines()[:1] if shutil.which("cmake") else "no cmake",
    }


def detect_decision() -> dict[str, Any]:
    """scripts/detect_gpus.py's decision on this machine, as setup.sh would take it."""
    text = _run_text([sys.executable, "-S", str(REPO / "scripts" / "detect_gpus.py"), "--json"], timeout=60)
    try:
        decision: dict[str, Any] = json.loads(text[text.index("{"):])
    except ValueError:
        return {"error": text[-400:]}
    return decision


def bandwidth_class(bandwidth: float | None, unified: bool) -> str:
    """A coarse label for what decode speed the memory allows."""
    if bandwidth is None:
        return "unknown (NVML gave no bus width or memory clock)"
    tb_s = bandwidth / 1e12
    if unified:
        return f"unified LPDDR class ({tb_s:.2f} TB/s)"
    if tb_s >= 2.0:
        return f"HBM class ({tb_s:.2f} TB/s)"
    if tb_s >= 0.5:
        return f"GDDR class ({tb_s:.2f} TB/s)"
    return f"low-bandwidth class ({tb_s:.2f} TB/s)"


def probe_gpus() -> dict[str, Any]:
    """hybridd's real NVML probe (GpuProbe on pynvml), as the daemon sees this machine."""
    from hybridd.probe.gpus import GpuProbe

    probe = GpuProbe.for_this_machine()
    try:
        snap = probe.snapshot()
    finally:
        probe.close()
    return {
        "gpus": [{"index": g.index, "name": g.name, "total_bytes": g.total_bytes, "free_bytes": g.free_bytes,
                  "used_bytes": g.used_bytes, "unified": g.unified, "display_active": g.display_active,
                  "bandwidth_bytes_s": g.bandwidth_bytes_s,
                  "bandwidth_class": bandwidth_class(g.bandwidth_bytes_s, g.unified),
                  "processes": len(g.processes)} for g in snap.gpus],
        "host_total_bytes": snap.host_total_bytes,
        "host_available_bytes": snap.host_available_bytes,
        "notes": list(snap.notes),
    }


def host_rss(pid: int | None) -> int | None:
    """The resident host memory of process pid (psutil), None when it cannot be read."""
    if pid is None:
        return None
    try:
        import psutil

        return int(psutil.Process(pid).memory_info().rss)
    except Exception:  # psutil missing or the process gone: the figure is simply absent
        return None


def gpu_memory(pid: int | None) -> dict[str, Any]:
    """NVML now: the device's used bytes and the bytes process pid holds (None where the driver will not say)."""
    from hybridd.probe.gpus import GpuProbe

    probe = GpuProbe.for_this_machine()
    try:
        snap = probe.snapshot()
    finally:
        probe.close()
    if not snap.gpus:
        return {"device_used_bytes": None, "process_bytes": None, "notes": list(snap.notes),
                "host_rss_bytes": host_rss(pid)}
    gpu = snap.gpus[0]
    held = next((p.used_bytes for p in gpu.processes if p.pid == pid), None)
    return {"device_used_bytes": gpu.used_bytes, "process_bytes": held,
            "processes": [[p.pid, p.used_bytes] for p in gpu.processes], "host_rss_bytes": host_rss(pid)}


def profile_for(gpus: list[dict[str, Any]]) -> str:
    """The hardware profile of the GPU found (the H100's on a machine without one: the dry run)."""
    for gpu in gpus:
        for fragment, profile in PROFILE_BY_GPU:
            if fragment in gpu["name"]:
                return profile
    return DEFAULT_PROFILE


# ---- build ----------------------------------------------------------------------------------------------------------


def unpack_source(carried: Path, cache: Path) -> tuple[str, Path]:
    """Unpack the carried llama.cpp where hybridd's build looks for it (its cache layout); (version, source)."""
    from hybridd.engine import build

    tarballs = sorted(carried.glob("llama.cpp-*.tar.gz"))
    if not tarballs:
        raise FileNotFoundError(f"no llama.cpp-<version>.tar.gz in {carried}: run bench/gpu_prepare.sh here first")
    version = tarballs[-1].name.removeprefix("llama.cpp-").removesuffix(".tar.gz")
    source = build.source_dir(cache, version)
    if not (source / "CMakeLists.txt").is_file():
        source.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tarballs[-1], "r:gz") as archive:
            archive.extractall(source.parent, filter="data")
    return version, source


def cmd_build(args: argparse.Namespace) -> int:
    """Build (or, dry, find) llama-server; write what happened to <work>/build.json."""
    work = Path(args.work)
    cache = work / "cache" / "hybridd" / "engines"
    record: dict[str, Any] = {"variant": "cuda" if args.cuda else "cpu", "archs": args.archs, "dry_run": args.dry_run}
    started = time.monotonic()
    record_path = work / "build.json"
    work.mkdir(parents=True, exist_ok=True)
    try:
        version, source = unpack_source(Path(args.carried), cache)
        record.update(version=version, unpack_s=round(time.monotonic() - started, 1))
        if args.dry_run:
            record.update(dry_build(version, source, work, args.archs))
        else:
            archs = tuple(a for a in args.archs.split(";") if a)
            record.update(cuda_build(version, source, cache, work, archs, args.jobs or (os.cpu_count() or 1)))
    except Exception as exc:  # recorded for the results file, which says the build failed and why
        record["error"] = f"{type(exc).__name__}: {exc}"
    record["seconds"] = round(time.monotonic() - started, 1)
    record_path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"gpu_check: build: {json.dumps(record, default=str)[:600]}", flush=True)
    return 1 if "error" in record else 0


def cuda_build(version: str, source: Path, cache: Path, work: Path, archs: tuple[str, ...],
               jobs: int) -> dict[str, Any]:
    """llama-server for CUDA archs with hybridd's configure and build arguments, installed where hybridd looks."""
    from hybridd.engine import build

    target = build.BuildTarget(version, archs, cuda=True)
    binary = build.binary_path(cache, target)
    if binary.is_file():
        return {"binary": str(binary), "already_built": True, "build_s": 0.0}
    tail = _Tail()
    reporter = build.Reporter(tail, tty=False)  # type: ignore[arg-type]  # a TextIO in all the Reporter uses
    try:
        return _cuda_build(version, source, cache, work, archs, jobs, target, binary, reporter)
    except build.BuildFailed as exc:
        raise build.BuildFailed(f"{exc}\n" + "\n".join(tail.lines)) from exc


def _cuda_build(version: str, source: Path, cache: Path, work: Path, archs: tuple[str, ...], jobs: int,
                target: Any, binary: Path, reporter: Any) -> dict[str, Any]:
    from hybridd.engine import build

    cmake, ninja = build.ensure_build_tools(sys.executable, reporter)
    nvcc = build.find_nvcc(dict(os.environ))
    if nvcc is None:
        raise build.BuildFailed("no nvcc: not on PATH, in $CUDACXX or /usr/local/cuda/bin")
    tree = build.build_dir(cache, target)
    extra, env_extra, libraries = library_args(work)
    env = dict(os.environ, **env_extra)
    env["PATH"] = f"{Path(ninja).parent}{os.pathsep}{env.get('PATH', '')}"
    configure = [cmake, *build.configure_args(source, tree, target), f"-DCMAKE_MAKE_PROGRAM={ninja}",
                 f"-DCMAKE_CUDA_COMPILER={nvcc}", *extra]
    started = time.monotonic()
    build.run_logged(configure, reporter, "cmake configure", env)
    configured_s = time.monotonic() - started
    steps = ninja_steps(ninja, tree)
    reporter.say(f"compiling llama-server ({target.variant}): {steps} steps, {jobs} jobs")
    build.run_logged([cmake, *build.build_args(tree, jobs)], reporter, "compiling", env)
    seconds = time.monotonic() - started
    build.install_binary(tree / "bin" / build.BINARY, binary,
                         {"version": version, "variant": target.variant, "jobs": jobs, "seconds": round(seconds, 1),
                          "cmake_args": configure[1:]})
    return {"binary": str(binary), "already_built": False, "jobs": jobs, "configure_s": round(configured_s, 1),
            "build_s": round(seconds, 1), "steps": steps, "libraries": libraries, "env": env_extra,
            "cmake_args": configure[1:]}


def _link_all(shim: Path, lib_dir: Path) -> None:
    """Links in shim to every file of lib_dir, under its own name and its unversioned one (libx.so.13 -> libx.so)."""
    shim.mkdir(parents=True, exist_ok=True)
    for real in lib_dir.iterdir():
        for name in {real.name, re.sub(r"\.so\..*$", ".so", real.name)}:
            link = shim / name
            if not link.exists() and not link.is_symlink():
                link.symlink_to(real)


def library_args(work: Path, stub: bool = False) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """cmake arguments and environment that give ggml-cuda cuBLAS and the driver library when the toolkit lacks
    them: cuBLAS from the pip wheel PyTorch installs (nvidia-cublas), libcuda from the driver's folder, each through
    a folder of links with the unversioned names cmake looks for; (args, env, where each came from). stub (the dry
    run's configure-only check on a machine with neither): names that let cmake generate, never link."""
    import glob

    args: list[str] = []
    env: dict[str, str] = {}
    found: dict[str, str] = {}
    shim = work / "lib-shim"
    lib_dirs: list[str] = []
    toolkit_cublas = [p for pattern in ("/usr/local/cuda*/lib64/libcublas.so*",
                                        "/usr/local/cuda*/targets/*/lib/libcublas.so*",
                                        "/usr/lib/*-linux-gnu/libcublas.so*") for p in glob.glob(pattern)]
    if toolkit_cublas:
        found["cublas"] = f"toolkit ({toolkit_cublas[0]})"
    else:
        roots = [p for p in sys.path if p.endswith("site-packages")]
        roots += glob.glob("/opt/*/.venv/lib/python3*/site-packages") + glob.glob("/usr/local/lib/python3*/*-packages")
        for root in roots:
            libs = sorted(glob.glob(f"{root}/nvidia/**/libcublas.so*", recursive=True))
            headers = glob.glob(f"{root}/nvidia/**/cublas_v2.h", recursive=True)
            if libs and headers:
                lib_dir = Path(libs[0]).parent
                _link_all(shim, lib_dir)
                lib_dirs.append(str(lib_dir))
                include = str(Path(headers[0]).parent)
                args += [f"-DCUDA_cublas_LIBRARY={shim / 'libcublas.so'}",
                         f"-DCUDA_cublasLt_LIBRARY={shim / 'libcublasLt.so'}",
                         f"-DCMAKE_CUDA_FLAGS=-I{include}", f"-DCMAKE_CXX_FLAGS=-I{include}"]
                found["cublas"] = f"pip wheel ({lib_dir})"
                break
    stubs = [p for pattern in ("/usr/local/cuda*/lib64/stubs/libcuda.so",
                               "/usr/local/cuda*/targets/*/lib/stubs/libcuda.so",
                               "/usr/lib/*-linux-gnu/libcuda.so", "/usr/lib64/libcuda.so") for p in glob.glob(pattern)]
    if stubs:
        found["cuda_driver"] = f"found by cmake ({stubs[0]})"
    else:
        driver = sorted(p for pattern in ("/usr/local/nvidia/lib64/libcuda.so*", "/usr/lib/*-linux-gnu/libcuda.so*",
                                          "/usr/lib64/libcuda.so*") for p in glob.glob(pattern))
        if driver:
            shim.mkdir(parents=True, exist_ok=True)
            link = shim / "libcuda.so"
            if not link.is_symlink():
                link.symlink_to(driver[0])
            args.append(f"-DCUDA_cuda_driver_LIBRARY={link}")
            found["cuda_driver"] = f"driver ({driver[0]})"
    if stub:
        fake = work / "no-such-lib"
        if "cublas" not in found:
            args += [f"-DCUDA_cublas_LIBRARY={fake}/libcublas.so", f"-DCUDA_cublasLt_LIBRARY={fake}/libcublasLt.so"]
            found["cublas"] = "none here: stubbed so cmake can generate (configure check only)"
        if "cuda_driver" not in found:
            args.append(f"-DCUDA_cuda_driver_LIBRARY={fake}/libcuda.so")
            found["cuda_driver"] = "none here: stubbed so cmake can generate (configure check only)"
    if lib_dirs:
        env["LD_LIBRARY_PATH"] = os.pathsep.join([str(shim), *lib_dirs, *filter(None, [os.environ.get(
            "LD_LIBRARY_PATH")])])
    return args, env, found


def dry_build(version: str, source: Path, work: Path, archs: str) -> dict[str, Any]:
    """The dry run's build step: this machine's cached CPU llama-server, and a CUDA configure of the trimmed source."""
    from hybridd.engine import build

    found = [b for b in build.built_binaries(build.cache_root(os.environ), version) if "-cpu/" in str(b)]
    record: dict[str, Any] = {"binary": str(found[0]) if found else None,
                              "note": "dry run: the CPU llama-server already built here is used; no compile"}
    if not found:
        record["error"] = "no CPU llama-server built here for this version (scripts/build_engines.sh)"
    nvcc = build.find_nvcc(dict(os.environ))
    cmake = shutil.which("cmake")
    ninja = shutil.which("ninja")
    if nvcc is None or cmake is None or ninja is None:
        record["cuda_configure"] = f"skipped: nvcc {nvcc}, cmake {cmake}, ninja {ninja}"
        return record
    target = build.BuildTarget(version, tuple(a for a in archs.split(";") if a) or ("90",), cuda=True)
    tree = work / "configure-cuda"
    shutil.rmtree(tree, ignore_errors=True)
    extra, env_extra, libraries = library_args(work, stub=True)
    argv = [cmake, *build.configure_args(source, tree, target), f"-DCMAKE_MAKE_PROGRAM={ninja}",
            f"-DCMAKE_CUDA_COMPILER={nvcc}", *extra]
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False,
                          env=dict(os.environ, **env_extra))
    ninja_file = tree / "build.ninja"
    record["cuda_configure"] = {
        "ok": done.returncode == 0 and ninja_file.is_file(),
        "seconds": round(time.monotonic() - started, 1),
        "archs": list(target.cuda_archs),
        "libraries": libraries,
        "compile_steps": ninja_steps(ninja, tree) if ninja_file.is_file() else None,
        "cuda_objects": cuda_objects(ninja, tree) if ninja_file.is_file() else None,
        "tail": (done.stdout + done.stderr).strip().splitlines()[-4:],
    }
    return record


def cuda_objects(ninja: str, tree: Path) -> int | None:
    """How many of those commands compile CUDA (.cu) sources: the bulk of a CUDA build's time."""
    done = subprocess.run([ninja, "-C", str(tree), "-t", "commands", "llama-server"], capture_output=True,
                          text=True, timeout=120, check=False)
    return sum(1 for line in done.stdout.splitlines() if "nvcc" in line and ".cu " in line + " ") \
        if done.returncode == 0 else None


def ninja_steps(ninja: str, tree: Path) -> int | None:
    """How many commands building llama-server runs from scratch (compiles and links): the build's size."""
    done = subprocess.run([ninja, "-C", str(tree), "-t", "commands", "llama-server"], capture_output=True, text=True,
                          timeout=120, check=False)
    return len(done.stdout.splitlines()) if done.returncode == 0 else None


# ---- one engine -----------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http_json(url: str, body: dict[str, Any] | None = None, timeout: float = 120.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read().decode())


@contextlib.contextmanager
def serving(binary: Path, model: Path, ctx: int, log: Path, env_extra: dict[str, str] | None = None,
            timeout_s: float = LOAD_TIMEOUT_S) -> Iterator[tuple[subprocess.Popen[bytes], str, float]]:
    """llama-server on model with hybridd's command line, all layers on the GPU; (process, base URL, load s)."""
    from hybridd.config import ModelEntry
    from hybridd.engine.llamaserver import llama_server_argv

    port = free_port()
    entry = ModelEntry(name=model.stem, path=model, ctx=ctx, flash_attn=True, type_k="f16", type_v="f16",
                       n_gpu_layers=-1, slots=1)
    argv = [*llama_server_argv(entry, port, binary), "-lv", "4"]  # -lv 4: the buffer sizes are logged
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_ARG_")}
    env.update(env_extra or {})
    base = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    with log.open("wb") as sink:
        proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        try:
            deadline = started + timeout_s
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"llama-server exited with {proc.returncode} while loading: "
                                       f"{_tail(log)}")
                with contextlib.suppress(OSError, ValueError):
                    urllib.request.urlopen(base + "/health", timeout=2).close()
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"llama-server did not load in {timeout_s:g} s: {_tail(log)}")
                _wait_quietly(proc, 0.25)  # the poll's pause: returns at once if the server exits
            yield proc, base, time.monotonic() - started
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=20)


def _wait_quietly(proc: subprocess.Popen[bytes], seconds: float) -> None:
    """Wait up to seconds for proc to exit."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=seconds)


def _tail(log: Path, lines: int = 3) -> str:
    try:
        text = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return " | ".join(text[-lines:])


def logged_buffers(log: Path) -> dict[str, Any]:
    """llama.cpp's own account of its buffers: '<device> <kind> buffer size = X MiB' lines, and its breakdown."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    buffers: dict[str, float] = {}
    for device, kind, mib in _BUFFER.findall(text):
        key = f"{device} {kind}"
        buffers[key] = round(buffers.get(key, 0.0) + float(mib), 2)
    breakdown = [line.split("common_memory_breakdown_print:", 1)[1].strip()
                 for line in text.splitlines() if "common_memory_breakdown_print:" in line]
    return {"buffers_mib": buffers, "breakdown": breakdown[-6:]}


def random_prompt(n_tokens: int, n_vocab: int, seed: int) -> list[int]:
    """n_tokens random ids past the byte tokens (at least one)."""
    rng = random.Random(seed)
    return [rng.randrange(259, n_vocab) for _ in range(max(1, n_tokens))]


def completion(base: str, depth: int, prompt: list[int], n_predict: int, cache_prompt: bool) -> dict[str, Any]:
    """One /completion of prompt, n_predict tokens decoded; depth and llama-server's timings."""
    body = {"prompt": prompt, "n_predict": n_predict, "ignore_eos": True, "cache_prompt": cache_prompt,
            "temperature": 0.0}
    timings = http_json(base + "/completion", body, timeout=600).get("timings", {})
    return {"depth": depth, "prompt_n": timings.get("prompt_n"), "predicted_n": timings.get("predicted_n"),
            "prefill_tok_s": _round(timings.get("prompt_per_second")),
            "decode_tok_s": _round(timings.get("predicted_per_second"))}


def decode_at(base: str, depth: int, n_predict: int, n_vocab: int, seed: int) -> dict[str, Any]:
    """One /completion with a depth-token prompt of random ids, uncached; its timings."""
    return completion(base, depth, random_prompt(depth, n_vocab, seed), n_predict, cache_prompt=False)


def decode_sweep(base: str, depths: tuple[int, ...], repeats: int, n_predict: int, n_vocab: int,
                 deadline: float) -> list[dict[str, Any]]:
    """Decode at each depth (ascending) repeats times; one random prompt grows, so with the prompt cache each depth
    prefills only what it adds to the last."""
    prompt = random_prompt(max(depths), n_vocab, seed=7)
    rows = []
    for depth in sorted(depths):
        for _ in range(repeats):
            if time.monotonic() > deadline:
                return rows
            rows.append(completion(base, depth, prompt[:max(1, depth)], n_predict, cache_prompt=True))
    return rows


def _round(value: Any, digits: int = 1) -> Any:
    return round(value, digits) if isinstance(value, (int, float)) else value


# ---- the plan's predictions -------------------------------------------------------------------------------------


def predict(model: Path, ctx: int, profile: str, depths: tuple[int, ...], n_predict: int) -> dict[str, Any]:
    """The plan for model at ctx on profile (memory parts and its reference request) and decode tok/s per depth."""
    from hybridd.model.memory import RunSettings, engine_outputs, estimate_memory
    from hybridd.model.spec import model_spec
    from hybridd.node.planning import PlanRequest, make_plan
    from hybridd.place.fit import fit_model
    from hybridd.place.speed import speed_model
    from hybridd.probe.gguf_file import read_gguf_header
    from hybridd.probe.hardware_profiles import load_hardware_profile

    plan = make_plan(PlanRequest(model=str(model), ctx=ctx, hardware=profile, flash_attn=True, type_k="f16",
                                 type_v="f16", slots=1, engine="llama-server"))
    keys = ("weights_bytes", "kv_bytes", "recurrent_bytes", "compute_bytes", "output_buffer_bytes", "reserve_bytes",
            "total_bytes", "fits", "offload_layers", "n_cpu_moe", "placement_reason")
    found: dict[str, Any] = {key: plan.get(key) for key in keys}
    found["devices"] = plan.get("devices")
    found["parts"] = {k: v for k, v in (plan.get("parts") or {}).items() if k != "layers"}
    found["options"] = plan.get("options")
    header = read_gguf_header(model)
    spec = model_spec(header.metadata, header.tensors)
    settings = RunSettings(ctx=ctx, n_seq=1, flash_attn=True, type_k="f16", type_v="f16",
                           n_outputs=engine_outputs("llama-server", 1))
    est = estimate_memory(spec, settings)
    hardware = load_hardware_profile(profile).hardware()
    fit = fit_model(est, list(hardware.devices), hardware.ram_bytes)
    speed = speed_model(spec, est, fit, hardware)
    # llama-server's figure is the mean over the n_predict tokens, so the prediction is taken at their middle
    found["decode_tok_s"] = {str(d): round(speed.decode_tok_s(d + n_predict // 2), 1) for d in depths}
    found["prefill_tok_s"] = round(speed.prefill_tok_s, 1)
    return found


# ---- measure ------------------------------------------------------------------------------------------------------


def measure_twin(twin: Twin, args: argparse.Namespace, binary: Path, profile: str, results: Results,
                 deadline: float, entries: list[dict[str, Any]]) -> None:
    """Write twin, then load it at each context; memory, speed and predictions into entries (saved as it goes)."""
    from gpu_check_twins import shrink, write_twin

    from hybridd.probe.model_profiles import load_profile

    work = Path(args.work)
    metadata = load_profile(twin.profile).metadata
    if args.dry_run:
        metadata = shrink(metadata, DRY_LAYERS, DRY_VOCAB)
    path = Path(args.twin_dir or work / "twins") / f"{twin.profile}-{twin.scheme}.gguf"
    path.parent.mkdir(parents=True, exist_ok=True)
    entry: dict[str, Any] = {"model_profile": twin.profile, "quant": twin.scheme, "shrunk_for_dry_run": args.dry_run,
                             "runs": []}
    entries.append(entry)
    written = write_twin(path, metadata, twin.scheme)
    entry.update(file_bytes=written.file_bytes, write_s=round(written.write_s, 1), n_vocab=written.n_vocab,
                 layers=metadata[f"{metadata['general.architecture']}.block_count"])
    results.save()
    baseline = gpu_memory(None)
    try:
        for ctx in sorted(twin.contexts):
            if time.monotonic() > deadline - args.reserve_s:
                results.skip(f"{twin.profile} {twin.scheme} ctx {ctx}", "the time budget is spent")
                break
            depths = tuple(d for d in twin.depths if d + args.n_predict < ctx) if ctx == max(twin.contexts) else (0,)
            run: dict[str, Any] = {"ctx": ctx}
            entry["runs"].append(run)
            try:
                run["predicted"] = predict(path, ctx, profile, depths, args.n_predict)
            except Exception as exc:  # the plan's API moves while others work on it; measure anyway
                run["predicted"] = {"error": f"{type(exc).__name__}: {exc}"}
            log = work / "logs" / f"{path.stem}-ctx{ctx}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            try:
                load_limit = max(10.0, min(LOAD_TIMEOUT_S, deadline - time.monotonic() - 5))
                with serving(binary, path, ctx, log, timeout_s=load_limit) as (proc, base, load_s):
                    run["load_s"] = round(load_s, 1)
                    decode_at(base, 0, 4, written.n_vocab, seed=99)  # warm-up: CUDA graphs, first-use allocations
                    loaded = gpu_memory(proc.pid)
                    run["decode"] = []
                    if args.sweep:
                        run["sweep"] = decode_sweep(base, depths, SWEEP_REPEATS, args.n_predict, written.n_vocab,
                                                    deadline - args.reserve_s / 2)
                    for k, depth in enumerate(() if args.sweep else depths):
                        if time.monotonic() > deadline - args.reserve_s / 2:
                            results.skip(f"{twin.profile} {twin.scheme} ctx {ctx} depth {depth}",
                                         "the time budget is spent")
                            break
                        got = decode_at(base, depth, args.n_predict, written.n_vocab, seed=k)
                        got["predicted_decode_tok_s"] = (run["predicted"].get("decode_tok_s") or {}).get(str(depth))
                        run["decode"].append(got)
                        results.save()
                    after = gpu_memory(proc.pid)
                    run["memory"] = _memory_entry(baseline, loaded, after)
            except Exception as exc:  # one failed load is recorded, the next context still runs
                run["error"] = f"{type(exc).__name__}: {exc}"
            run["llama_cpp"] = logged_buffers(log)
            results.save()
    finally:
        if not args.keep_twins:
            path.unlink(missing_ok=True)


def _memory_entry(baseline: dict[str, Any], loaded: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Per-process bytes (NVML) after load and after the requests, and the device's used bytes over its idle."""
    base_used = baseline.get("device_used_bytes")
    used = after.get("device_used_bytes")
    return {
        "process_bytes_loaded": loaded.get("process_bytes"),
        "process_bytes_after_requests": after.get("process_bytes"),
        "device_used_delta_bytes": used - base_used if isinstance(used, int) and isinstance(base_used, int) else None,
        "device_idle_used_bytes": base_used,
        "host_rss_bytes_after_requests": after.get("host_rss_bytes"),
        "nvml_processes": after.get("processes"),
        "notes": after.get("notes"),
    }


def cpu_build_warning(args: argparse.Namespace, gpu_count: int, cuda_binary: Path | None) -> dict[str, Any]:
    """Issue 17 item 2's warning for a CPU llama-server on this box: hybridd's own probe and wording."""
    from hybridd.probe.engine_builds import engine_warnings, plans_cpu_only, probe_llama_server

    carried = Path(args.carried) / "llama-server-cpu.gz"
    candidates: list[tuple[str, Path, dict[str, str]]] = []
    if carried.is_file():
        import gzip

        target = Path(args.work) / "llama-server-cpu"
        target.write_bytes(gzip.decompress(carried.read_bytes()))
        target.chmod(0o755)
        candidates.append(("CPU build carried from the CPU machine", target, {}))
    if cuda_binary is not None:
        candidates.append(("the CUDA build with the GPU hidden (CUDA_VISIBLE_DEVICES='')", cuda_binary,
                           {"CUDA_VISIBLE_DEVICES": ""}))
    report: dict[str, Any] = {"gpu_count": gpu_count, "tried": []}
    for label, binary, env in candidates:
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            found = probe_llama_server(binary)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        tried = {"build": label, "binary": str(binary), "describe": found.describe(),
                 "warnings": engine_warnings([found], gpu_count),
                 "plans_cpu_only": plans_cpu_only([found], gpu_count)}
        if gpu_count == 0:  # no GPU here (the dry run): the same build as a one-GPU box's probe would judge it
            tried["warnings_if_1_gpu"] = engine_warnings([found], 1)
            tried["plans_cpu_only_if_1_gpu"] = plans_cpu_only([found], 1)
        report["tried"].append(tried)
        if found.gpu_offload is not None:
            report.update(tried)
            break
    return report


def cmd_measure(args: argparse.Namespace) -> int:
    started = time.monotonic()
    deadline = started + args.budget_s
    outputs = [Path(args.results)]
    if os.environ.get("OUT"):
        outputs.append(Path(os.environ["OUT"]) / Path(args.results).name)
    results = Results(outputs, started)
    results.set("started_at", dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
    results.set("dry_run", args.dry_run)
    results.set("environment", environment())
    results.set("detect_gpus", detect_decision())
    build_record = Path(args.work) / "build.json"
    built = json.loads(build_record.read_text()) if build_record.is_file() else {"error": "no build step ran"}
    results.set("build", built)
    os.environ.update(built.get("env") or {})  # cuBLAS from a pip wheel: where the binary finds it
    try:
        probe = probe_gpus()
    except Exception as exc:
        probe = {"gpus": [], "notes": [f"{type(exc).__name__}: {exc}"]}
    results.set("probe", probe)
    gpus = probe.get("gpus", [])
    results.set("gpu", gpus[0]["name"] if gpus else "none (no NVML GPU: dry run or CPU machine)")
    profile = profile_for(gpus)
    results.set("hardware_profile", profile)
    binary = Path(built["binary"]) if built.get("binary") else None
    entries: list[dict[str, Any]] = []
    results.set("twins", entries)
    if binary is None or not binary.is_file():
        results.skip("the twins", f"no llama-server: {built.get('error', 'the build left none')}")
    else:
        for twin in DRY_TWINS if args.dry_run else SWEEP_TWINS if args.sweep else DEVICE_TWINS:
            left = deadline - time.monotonic()
            if left < args.reserve_s or (twin.optional and left < args.optional_s):
                results.skip(f"{twin.profile} {twin.scheme}", f"{left:.0f} s left of the budget")
                continue
            try:
                measure_twin(twin, args, binary, profile, results, deadline, entries)
            except Exception as exc:  # a twin that cannot be written or loaded, the next still runs
                results.error(f"{twin.profile} {twin.scheme}", exc)
    cuda_binary = binary if binary is not None and "-cuda" in str(binary) else None
    if cuda_binary is not None:
        from hybridd.probe.engine_builds import engine_warnings, probe_llama_server

        found = probe_llama_server(cuda_binary)
        results.set("cuda_build", {"describe": found.describe(), "devices": list(found.devices),
                                   "warnings": engine_warnings([found], len(gpus))})
    try:
        results.set("cpu_build_warning", cpu_build_warning(args, len(gpus), cuda_binary))
    except Exception as exc:
        results.error("cpu_build_warning", exc)
    results.set("finished_at", dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
    print(summary(results.body), flush=True)
    return 0


def summary(body: dict[str, Any]) -> str:
    """A few lines for the terminal: what was measured next to what was predicted."""
    built = body.get("build", {})
    configured = built.get("cuda_configure")
    how = (f"{built['build_s']} s" if "build_s" in built else built.get("error") or built.get("note", "?"))
    if isinstance(configured, dict):
        how += (f"; CUDA configure of the trimmed source: {'ok' if configured.get('ok') else 'FAILED'}, "
                f"{configured.get('compile_steps')} build steps, {configured.get('cuda_objects')} CUDA objects")
    lines = [f"gpu_check on {body.get('gpu')} (profile {body.get('hardware_profile')}), {body.get('elapsed_s')} s",
             f"  build: {how}"]
    for gpu in body.get("probe", {}).get("gpus", []):
        lines.append(f"  NVML: {gpu['name']}: {gpu['total_bytes'] / GIB:.1f} GiB, {gpu['free_bytes'] / GIB:.1f} free, "
                     f"display {'on' if gpu['display_active'] else 'off'}, {gpu['bandwidth_class']}")
    for note in body.get("probe", {}).get("notes", []):
        lines.append(f"  NVML: {note}")
    for twin in body.get("twins", []):
        for run in twin.get("runs", []):
            predicted = run.get("predicted", {})
            memory = run.get("memory", {})
            held = (memory.get("process_bytes_after_requests") or memory.get("device_used_delta_bytes")
                    or memory.get("host_rss_bytes_after_requests"))
            total = predicted.get("total_bytes")
            lines.append(f"  {twin['model_profile']} {twin['quant']} ctx {run['ctx']}: memory "
                         f"{_gib(held)} measured / {_gib(total)} predicted; load {run.get('load_s')} s"
                         + (f"; error {run['error'][:120]}" if run.get("error") else ""))
            for depth in sorted({row["depth"] for row in run.get("sweep", [])}):
                got = [str(row["decode_tok_s"]) for row in run["sweep"] if row["depth"] == depth]
                lines.append(f"    depth {depth}: decode {' / '.join(got)} tok/s")
            for got in run.get("decode", []):
                lines.append(f"    depth {got['depth']}: decode {got['decode_tok_s']} tok/s measured / "
                             f"{got.get('predicted_decode_tok_s')} predicted, prefill {got['prefill_tok_s']} tok/s")
    if "cuda_build" in body:
        lines.append(f"  CUDA build: {body['cuda_build']['describe']}: warnings {body['cuda_build']['warnings']}")
    warning = body.get("cpu_build_warning", {})
    lines.append(f"  CPU build: {warning.get('describe')}: warnings {warning.get('warnings')}, "
                 f"plans CPU-only: {warning.get('plans_cpu_only')}"
                 + (f"; with 1 GPU: {warning['warnings_if_1_gpu']}, plans CPU-only: "
                    f"{warning['plans_cpu_only_if_1_gpu']}" if "warnings_if_1_gpu" in warning else ""))
    lines.extend(f"  skipped {s['what']}: {s['why']}" for s in body.get("skipped", []))
    lines.extend(f"  error in {e['step']}: {e['error'][:200]}" for e in body.get("errors", []))
    return "\n".join(lines)


def _gib(value: Any) -> str:
    return f"{value / GIB:.2f} GiB" if isinstance(value, (int, float)) else "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("build", "measure"):
        cmd = sub.add_parser(name)
        cmd.add_argument("--work", required=True, help="scratch folder (kept between calls on a warm machine)")
        cmd.add_argument("--carried", default=str(REPO / "bench" / ".gpu"), help="what bench/gpu_prepare.sh made")
        cmd.add_argument("--dry-run", action="store_true")
    build_cmd = sub.choices["build"]
    build_cmd.add_argument("--cuda", action="store_true")
    build_cmd.add_argument("--archs", default="", help="CUDA architectures, '90' or '89;120'")
    build_cmd.add_argument("--jobs", type=int, default=0)
    measure_cmd = sub.choices["measure"]
    measure_cmd.add_argument("--results", required=True, help="the JSON to write")
    measure_cmd.add_argument("--budget-s", type=float, default=300.0, help="seconds this step may take")
    measure_cmd.add_argument("--reserve-s", type=float, default=25.0, help="kept for the last steps")
    measure_cmd.add_argument("--optional-s", type=float, default=60.0, help="needed to start an optional twin")
    measure_cmd.add_argument("--n-predict", type=int, default=128, help="tokens decoded per request")
    measure_cmd.add_argument("--keep-twins", action="store_true")
    measure_cmd.add_argument("--sweep", action="store_true", help="SWEEP_TWINS: many depths, repeated")
    measure_cmd.add_argument("--twin-dir", default="", help="where twins are written (default <work>/twins)")
    args = parser.parse_args(argv)
    return cmd_build(args) if args.command == "build" else cmd_measure(args)


if __name__ == "__main__":
    sys.exit(main())
