"""Build llama-server from the llama.cpp that the installed llama-cpp-python vendors, or rebuild llama-cpp-python.

The decisions (where things go, what cmake is told, how long it takes) are pure functions of their arguments; the
driver at the bottom downloads, unpacks, runs cmake and installs, writing progress to a stream.

Cache layout under `$XDG_CACHE_HOME/hybridd/engines` (default `~/.cache/hybridd/engines`):

    src/llama_cpp_python-<version>.tar.gz          the sdist pip downloaded (kept, reused)
    src/llama_cpp_python-<version>/vendor/llama.cpp its vendored llama.cpp (only that part is unpacked)
    build/llama-server-<version>-<variant>/        the cmake build tree (kept: a rerun after a failure resumes)
    llama-server-<version>-<variant>/bin/llama-server   the installed binary; <variant> is cpu or cuda-sm_89-sm_120
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from hybridd.errors import HybriddError

DISTRIBUTION = "llama-cpp-python"
BINARY = "llama-server"
TARGETS = ("llama-server", "llama-cpp-python")
# Core-seconds of compiling, measured: the CPU llama-server build of 0.3.36 on this project's idle 2-core machine took
# CPU_BUILD_CORE_S / 2 seconds. CUDA kernels cost far more, and again for every architecture.
CPU_BUILD_CORE_S = 760.0
CUDA_BUILD_CORE_S = 3000.0
CUDA_ARCH_CORE_S = 5000.0
_PROGRESS = re.compile(r"^\[(\d+)/(\d+)\]")
# A cmake CUDA architecture: the compute capability without its dot, sm_50 and newer without a leading zero (89,
# 120, 121), nvcc's arch-specific "a" forms from 90 (90a, 120a) and its family "f" forms from 100 (100f).
_CUDA_ARCH = re.compile(r"[5-8]\d|(?:9\d|[1-9]\d\d)a?|[1-9]\d\df")
ARCHS_VARIABLE = "HYBRIDD_CUDA_ARCHS"  # scripts/setup.sh and scripts/detect_gpus.py read it too
_SDIST_NAMES = ("llama_cpp_python-{v}.tar.gz", "llama-cpp-python-{v}.tar.gz")


class BuildFailed(HybriddError):
    """An engine build could not finish: a tool is missing, a download or cmake failed; the message says which."""


@dataclass(frozen=True)
class BuildTarget:
    """One llama-server build: the llama-cpp-python version whose llama.cpp it compiles, for the CPU or for CUDA."""

    version: str
    cuda_archs: tuple[str, ...] = ()  # compute capabilities without the dot ("89", "120"); () = a CPU build
    cuda: bool = False

    @property
    def variant(self) -> str:
        """'cpu', or 'cuda-sm_89-sm_120' (or just 'cuda' when cmake picks the architectures)."""
        if not self.cuda:
            return "cpu"
        return "-".join(["cuda", *(f"sm_{arch}" for arch in self.cuda_archs)])

    @property
    def name(self) -> str:
        return f"{BINARY}-{self.version}-{self.variant}"


def cache_root(env: Mapping[str, str]) -> Path:
    """Where built engines live: $XDG_CACHE_HOME/hybridd/engines, XDG_CACHE_HOME defaulting to ~/.cache."""
    base = env.get("XDG_CACHE_HOME") or str(Path(env.get("HOME") or Path.home()) / ".cache")
    return Path(base) / "hybridd" / "engines"


def install_dir(root: Path, target: BuildTarget) -> Path:
    return root / target.name


def binary_path(root: Path, target: BuildTarget) -> Path:
    """The installed llama-server of target."""
    return install_dir(root, target) / "bin" / BINARY


def build_dir(root: Path, target: BuildTarget) -> Path:
    return root / "build" / target.name


def source_dir(root: Path, version: str) -> Path:
    """The vendored llama.cpp of llama-cpp-python version, once unpacked."""
    return root / "src" / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"


def find_sdist(root: Path, version: str) -> Path | None:
    """The downloaded sdist of version, under either spelling of its name."""
    for pattern in _SDIST_NAMES:
        path = root / "src" / pattern.format(v=version)
        if path.is_file():
            return path
    return None


def built_binaries(root: Path, version: str) -> list[Path]:
    """Installed llama-server binaries for version, CUDA builds first (the most architectures first), then CPU."""
    found = [p / "bin" / BINARY for p in root.glob(f"{BINARY}-{version}-*") if (p / "bin" / BINARY).is_file()]
    found = [p for p in found if os.access(p, os.X_OK)]

    def rank(path: Path) -> tuple[int, int, str]:
        variant = path.parent.parent.name.removeprefix(f"{BINARY}-{version}-")
        return (0 if variant.startswith("cuda") else 1, -variant.count("sm_"), variant)

    return sorted(found, key=rank)


def cuda_architectures(compute_caps: str) -> tuple[str, ...]:
    """nvidia-smi's compute_cap lines ('8.9', '12.0') as cmake architectures ('89', '120'), sorted, no repeats."""
    archs: set[str] = set()
    for line in compute_caps.splitlines():
        match = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", line)
        if match:
            archs.add(match.group(1) + match.group(2))
    return tuple(sorted(archs, key=int))


def parse_cuda_archs(text: str, source: str) -> tuple[str, ...]:
    """'89;120' as cmake architectures ('89', '120'), sorted, no repeats; ',' and spaces separate too, as in
    scripts/detect_gpus.py. A bad one raises BuildFailed naming source, the variable or flag it came from."""
    archs = [arch for arch in re.split(r"[;, ]+", text.strip()) if arch]
    bad = [arch for arch in archs if not _CUDA_ARCH.fullmatch(arch)]
    if bad or not archs:
        what = f"{bad[0]!r} is not a CUDA architecture" if bad else "no CUDA architecture given"
        raise BuildFailed(f"{source}: {what} (valid: compute capabilities without the dot, separated by ';', "
                          "e.g. 89;120 or 90a)")
    return tuple(sorted(set(archs), key=lambda arch: (int(arch.rstrip("af")), arch)))


def requested_archs(flag: str | None, env: Mapping[str, str]) -> tuple[tuple[str, ...], str] | None:
    """(architectures, where they came from) asked for by --cuda-archs, else $HYBRIDD_CUDA_ARCHS; None when neither
    (an empty variable is unset)."""
    if flag is not None:
        return parse_cuda_archs(flag, "--cuda-archs"), "--cuda-archs"
    value = env.get(ARCHS_VARIABLE, "")
    return (parse_cuda_archs(value, ARCHS_VARIABLE), ARCHS_VARIABLE) if value.strip() else None


def configure_args(source: Path, build: Path, target: BuildTarget, generator: str = "Ninja") -> list[str]:
    """cmake's configure arguments: Release, static, only what llama-server needs, no network at build time."""
    args = [
        "-S", str(source), "-B", str(build), "-G", generator,
        "-DCMAKE_BUILD_TYPE=Release",
        "-DBUILD_SHARED_LIBS=OFF",  # one self-contained binary: no libllama/libggml to ship beside it
        f"-DGGML_CUDA={'ON' if target.cuda else 'OFF'}",
        "-DLLAMA_BUILD_COMMON=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON",
        "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_APP=OFF",
        # No HTTPS client (model downloads by URL): hybridd hands the engine a file; it keeps the binary free of
        # libcurl/OpenSSL. LLAMA_CURL is the older llama.cpp's switch for the same thing.
        "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
        # The web UI would otherwise be fetched from Hugging Face at build time; hybridd serves no UI.
        "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
    ]
    if target.cuda and target.cuda_archs:
        args.append(f"-DCMAKE_CUDA_ARCHITECTURES={';'.join(target.cuda_archs)}")
    return args


def build_args(build: Path, jobs: int) -> list[str]:
    """cmake's build arguments: the llama-server target alone, jobs at once."""
    return ["--build", str(build), "--target", BINARY, "--config", "Release", "-j", str(jobs)]


def pip_download_argv(python: str, version: str, dest: Path) -> list[str]:
    """Fetch exactly version's sdist (the source pip compiles llama-cpp-python from) into dest."""
    return [python, "-m", "pip", "download", f"{DISTRIBUTION}=={version}", "--no-deps", "--no-binary", ":all:",
            "--dest", str(dest)]


def pip_reinstall_argv(python: str, version: str) -> list[str]:
    """Rebuild llama-cpp-python version from source; its dependencies stay as they are."""
    return [python, "-m", "pip", "install", "--force-reinstall", "--no-cache-dir", "--no-deps",
            "--no-binary", DISTRIBUTION, f"{DISTRIBUTION}=={version}"]


def reinstall_cmake_args(target: BuildTarget) -> str:
    """CMAKE_ARGS for llama-cpp-python's own build."""
    args = [f"-DGGML_CUDA={'on' if target.cuda else 'off'}"]
    if target.cuda and target.cuda_archs:
        args.append(f"-DCMAKE_CUDA_ARCHITECTURES={';'.join(target.cuda_archs)}")
    return " ".join(args)


def estimate_seconds(target: BuildTarget, jobs: int) -> float:
    """A rough wall time for a cold build with jobs compilers at once."""
    core_s = CPU_BUILD_CORE_S
    if target.cuda:
        core_s += CUDA_BUILD_CORE_S + CUDA_ARCH_CORE_S * max(1, len(target.cuda_archs))
    return core_s / max(1, jobs)


def describe_duration(seconds: float) -> str:
    """'about 12 minutes' or 'about 1.5 hours'."""
    minutes = seconds / 60
    if minutes < 90:
        return f"about {max(1, round(minutes))} minute{'s' if round(minutes) > 1 else ''}"
    return f"about {minutes / 60:.1f} hours"


def ninja_progress(line: str) -> tuple[int, int] | None:
    """(done, total) from a ninja status line '[12/206] Building ...', else None."""
    match = _PROGRESS.match(line)
    return (int(match.group(1)), int(match.group(2))) if match else None


def default_jobs(cpu_count: int | None) -> int:
    return max(1, cpu_count or 1)


# ---- I/O at the edges -------------------------------------------------------------------------------------------


def installed_version(python: str | None = None) -> str | None:
    """The installed llama-cpp-python version: in this interpreter, or (python given) in that one's environment."""
    if python is None:
        from importlib import metadata

        try:
            return metadata.version(DISTRIBUTION)
        except metadata.PackageNotFoundError:
            return None
    code = ("import importlib.metadata as m\ntry: print(m.version('llama-cpp-python'))\n"
            "except m.PackageNotFoundError: pass\n")
    try:
        done = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


def query_compute_caps(nvidia_smi: str = "nvidia-smi") -> str:
    """nvidia-smi's compute capabilities, one line per GPU; '' when there is no driver or GPU."""
    try:
        done = subprocess.run([nvidia_smi, "--query-gpu=compute_cap", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout if done.returncode == 0 else ""


def find_nvcc(env: Mapping[str, str]) -> str | None:
    """The CUDA compiler cmake would find: $CUDACXX, nvcc on PATH, or the toolkit's usual place."""
    for candidate in (env.get("CUDACXX"), shutil.which("nvcc", path=env.get("PATH")), "/usr/local/cuda/bin/nvcc"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def find_tool(name: str, python: str) -> str | None:
    """A build tool from PATH, else from the bin folder of python's environment."""
    found = shutil.which(name)
    if found:
        return found
    beside = Path(python).parent / name
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None


class Reporter:
    """Progress to a stream: one rewritten percentage line on a terminal, plain lines otherwise."""

    def __init__(self, out: TextIO, tty: bool | None = None) -> None:
        self.out = out
        self.tty = out.isatty() if tty is None else tty
        self._last_percent = -1
        self._open_line = False

    def say(self, text: str) -> None:
        self._end_line()
        self.out.write(text + "\n")
        self.out.flush()

    def progress(self, label: str, done: int, total: int) -> None:
        percent = done * 100 // max(1, total)
        if self.tty:
            self.out.write(f"\r  {label}: {percent:3d}% ({done}/{total})")
            self._open_line = True
        elif percent // 10 != self._last_percent // 10 or done == total:  # a line every 10 %, for logs
            self.out.write(f"  {label}: {percent}% ({done}/{total})\n")
        self._last_percent = percent
        self.out.flush()

    def _end_line(self) -> None:
        if self._open_line:
            self.out.write("\n")
            self._open_line = False


def run_logged(argv: Sequence[str], reporter: Reporter, label: str, env: Mapping[str, str] | None = None,
               tail_lines: int = 40) -> None:
    """Run argv; ninja's '[n/m]' lines become progress, the rest is kept; on failure raise with the last lines."""
    tail: list[str] = []
    try:
        proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", env=dict(env) if env is not None else None)
    except OSError as exc:
        raise BuildFailed(f"{label}: cannot run {argv[0]}: {exc}") from exc
    assert proc.stdout is not None
    with proc:
        for line in proc.stdout:
            line = line.rstrip()
            step = ninja_progress(line)
            if step is not None:
                reporter.progress(label, *step)
            elif line:
                tail.append(line)
            del tail[:-tail_lines]
    if proc.returncode != 0:
        reporter.say("\n".join(tail))
        raise BuildFailed(f"{label} failed (exit {proc.returncode}): {' '.join(argv)}")


def ensure_build_tools(python: str, reporter: Reporter) -> tuple[str, str]:
    """cmake and ninja, pip-installed into python's environment when neither PATH nor it has them."""
    missing = [name for name in ("cmake", "ninja") if find_tool(name, python) is None]
    if missing:
        reporter.say(f"installing {' and '.join(missing)} from PyPI into {Path(python).parent.parent}")
        run_logged([python, "-m", "pip", "install", "--quiet", *missing], reporter, "pip install")
    cmake, ninja = find_tool("cmake", python), find_tool("ninja", python)
    if cmake is None or ninja is None:
        raise BuildFailed("cmake and ninja are needed to build llama-server; `pip install cmake ninja` did not "
                          "provide them")
    return cmake, ninja


def fetch_source(root: Path, version: str, python: str, reporter: Reporter) -> Path:
    """The vendored llama.cpp of llama-cpp-python version: downloaded and unpacked once, then reused."""
    source = source_dir(root, version)
    if (source / "CMakeLists.txt").is_file():
        return source
    sdist = find_sdist(root, version)
    if sdist is None:
        reporter.say(f"downloading the llama-cpp-python {version} source (about 80 MB)")
        (root / "src").mkdir(parents=True, exist_ok=True)
        run_logged(pip_download_argv(python, version, root / "src"), reporter, "pip download")
        sdist = find_sdist(root, version)
        if sdist is None:
            raise BuildFailed(f"pip download left no llama-cpp-python {version} sdist in {root / 'src'}")
    reporter.say(f"unpacking vendor/llama.cpp from {sdist.name}")
    unpack_vendored(sdist, source.parent.parent)
    if not (source / "CMakeLists.txt").is_file():
        raise BuildFailed(f"{sdist} has no vendor/llama.cpp/CMakeLists.txt")
    return source


def unpack_vendored(sdist: Path, dest: Path) -> None:
    """Unpack only <top>/vendor/llama.cpp of sdist as dest/vendor/llama.cpp, atomically (a temp folder renamed)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".unpack-") as scratch:
        with tarfile.open(sdist, "r:gz") as archive:
            members = [m for m in archive.getmembers() if "/vendor/llama.cpp/" in m.name + "/"
                       and m.name.split("/", 2)[1:2] == ["vendor"]]
            if not members:
                raise BuildFailed(f"{sdist} has no vendor/llama.cpp")
            archive.extractall(scratch, members=members, filter="data")
        top = Path(scratch) / members[0].name.split("/", 1)[0]
        shutil.rmtree(dest, ignore_errors=True)
        top.rename(dest)


def install_binary(built: Path, target_binary: Path, record: Mapping[str, object]) -> None:
    """Copy the built binary into place atomically, with a build.json beside its bin folder."""
    target_binary.parent.mkdir(parents=True, exist_ok=True)
    staged = target_binary.with_name(f".{BINARY}.tmp")
    shutil.copy2(built, staged)
    staged.chmod(0o755)
    os.replace(staged, target_binary)
    (target_binary.parent.parent / "build.json").write_text(json.dumps(record, indent=2) + "\n")


@dataclass(frozen=True)
class BuildResult:
    """What a build run did: the binary, and whether it was already there."""

    binary: Path
    already_built: bool
    seconds: float


def resolve_target(version: str, cuda: bool, compute_caps: Callable[[], str] = query_compute_caps,
                   archs: tuple[str, ...] | None = None) -> BuildTarget:
    """The build for version: CUDA for archs when given (--cuda-archs, $HYBRIDD_CUDA_ARCHS), else for this
    machine's GPUs' architectures; or CPU."""
    if not cuda:
        return BuildTarget(version)
    return BuildTarget(version, archs if archs is not None else cuda_architectures(compute_caps()), cuda=True)


def build_llama_server(target: BuildTarget, root: Path, jobs: int, python: str, out: TextIO,
                       force: bool = False) -> BuildResult:
    """Build and install target's llama-server, or find it already installed."""
    reporter = Reporter(out)
    started = time.monotonic()
    binary = binary_path(root, target)
    if binary.is_file() and not force:
        reporter.say(f"llama-server {target.variant} for llama-cpp-python {target.version} is already built: "
                     f"{binary}")
        return BuildResult(binary, True, 0.0)
    if target.cuda and not target.cuda_archs:
        reporter.say("nvidia-smi reported no GPU: cmake picks the CUDA architectures (a slower, larger build)")
    cmake, ninja = ensure_build_tools(python, reporter)
    reporter.say(f"building llama-server ({target.variant}) from llama-cpp-python {target.version}'s llama.cpp "
                 f"with {jobs} job{'s' if jobs > 1 else ''}: {describe_duration(estimate_seconds(target, jobs))} "
                 "on a cold build")
    source = fetch_source(root, target.version, python, reporter)
    build = build_dir(root, target)
    env = dict(os.environ)
    env["PATH"] = f"{Path(ninja).parent}{os.pathsep}{env.get('PATH', '')}"
    configure = [cmake, *configure_args(source, build, target), f"-DCMAKE_MAKE_PROGRAM={ninja}"]
    nvcc = find_nvcc(env) if target.cuda else None
    if nvcc is not None:  # cmake looks on PATH only; the toolkit often sits in /usr/local/cuda without being there
        configure.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
    reporter.say("configuring (cmake)")
    run_logged(configure, reporter, "cmake configure", env)
    run_logged([cmake, *build_args(build, jobs)], reporter, "compiling", env)
    built = build / "bin" / BINARY
    if not built.is_file():
        raise BuildFailed(f"cmake finished but left no {built}")
    seconds = time.monotonic() - started
    install_binary(built, binary, {"version": target.version, "variant": target.variant, "jobs": jobs,
                                   "seconds": round(seconds, 1), "cmake_args": configure_args(source, build, target)})
    reporter.say(f"installed {binary} ({binary.stat().st_size / 2**20:.0f} MiB) in {seconds:.0f} s")
    return BuildResult(binary, False, seconds)


def rebuild_llama_cpp_python(target: BuildTarget, jobs: int, python: str, out: TextIO) -> float:
    """Reinstall llama-cpp-python target.version into python's environment, compiled for CUDA or the CPU."""
    reporter = Reporter(out)
    cmake_args = reinstall_cmake_args(target)
    reporter.say(f"rebuilding llama-cpp-python {target.version} ({target.variant}) with CMAKE_ARGS=\"{cmake_args}\" "
                 f"into {Path(python).parent.parent}: "
                 f"{describe_duration(estimate_seconds(target, jobs) * 1.3)} on a cold build")
    env = dict(os.environ, CMAKE_ARGS=cmake_args, CMAKE_BUILD_PARALLEL_LEVEL=str(jobs))
    started = time.monotonic()
    run_logged(pip_reinstall_argv(python, target.version), reporter, "pip install", env)
    seconds = time.monotonic() - started
    reporter.say(f"reinstalled llama-cpp-python {target.version} ({target.variant}) in {seconds:.0f} s")
    return seconds
