"""What each engine build can offload to: llama-cpp-python asked in a subprocess, llama-server by `--list-devices`.

Both are asked in a child process, so the daemon never loads llama.cpp itself to find out. Parsing the answers
(`parse_offload_answer`, `parse_list_devices`, `parse_server_version`) and judging them against the GPUs the probe
sees (`unused_gpus`, `unused_gpu_warning`, `plans_cpu_only`) are pure functions of text and numbers; only
`probe_llama_cpp_python` and `probe_llama_server` run anything. Neither raises: a build that cannot be asked is an
`EngineBuild` with `gpu_offload` None and the reason in `problem`.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

LLAMA_CPP_PYTHON = "llama-cpp-python"
LLAMA_SERVER = "llama-server"
ASK_TIMEOUT_S = 60.0  # importing llama_cpp from a cold disk, or a CUDA build initialising every GPU, takes seconds

# Run by the engine's interpreter: one JSON line, whatever happens, so the answer is told apart from a crash.
OFFLOAD_QUERY = (
    "import json\n"
    "try:\n"
    "    import llama_cpp\n"
    "except ImportError as exc:\n"
    "    print(json.dumps({'installed': False, 'error': str(exc)}))\n"
    "else:\n"
    "    print(json.dumps({'installed': True, 'version': getattr(llama_cpp, '__version__', None),\n"
    "                      'gpu_offload': bool(llama_cpp.llama_supports_gpu_offload())}))\n"
)

# `--list-devices` rows: "  CUDA0: NVIDIA GeForce RTX 4090 (24080 MiB, 23661 MiB free)"; the CPU is never listed.
_DEVICE_ROW = re.compile(r"^\s+([A-Za-z]+)(\d+):\s*(.+?)\s*$")
_VERSION = re.compile(r"^version:\s*(.+?)\s*$", re.MULTILINE)
_CUDA_INIT_FAILED = re.compile(r"ggml_cuda_init: failed to initialize CUDA:\s*(.+?)\s*$", re.MULTILINE)
# Backends that drive the NVIDIA GPUs NVML shows; Metal, ROCm and SYCL devices are not those.
NVIDIA_BACKENDS = ("CUDA", "Vulkan")


@dataclass(frozen=True)
class EngineBuild:
    """One engine build and what it can offload to; gpu_offload None = it could not be asked (see problem)."""

    engine: str  # LLAMA_CPP_PYTHON or LLAMA_SERVER
    location: str  # the interpreter, or the llama-server binary
    installed: bool
    version: str | None = None
    gpu_offload: bool | None = None
    devices: tuple[str, ...] = ()  # llama-server only: "CUDA0: NVIDIA GeForce RTX 4090 (24080 MiB, ...)"
    problem: str = ""

    @property
    def backends(self) -> tuple[str, ...]:
        """The backends it runs on: ("CUDA",), ("CPU",), or () when unknown."""
        if not self.installed or self.gpu_offload is None:
            return ()
        if self.engine == LLAMA_SERVER:
            found = tuple(dict.fromkeys(_backend(d) for d in self.devices))
            return (*found, "CPU") if found else ("CPU",)
        return ("GPU", "CPU") if self.gpu_offload else ("CPU",)

    def describe(self) -> str:
        """One line: '<engine> <version> at <location>: CUDA (2 devices)' or '...: CPU only'."""
        head = f"{self.engine} {self.version or ''}".rstrip() + f" ({self.location})"
        if not self.installed:
            return f"{head}: not installed" + (f" ({self.problem})" if self.problem else "")
        if self.gpu_offload is None:
            return f"{head}: cannot tell what it offloads to ({self.problem})"
        if not self.gpu_offload:
            return f"{head}: CPU only" + (f" ({self.problem})" if self.problem else "")
        if self.engine == LLAMA_SERVER:
            return f"{head}: {', '.join(self.devices)}"
        return f"{head}: GPU offload"


def parse_offload_answer(stdout: str) -> tuple[bool, str | None, bool | None, str]:
    """OFFLOAD_QUERY's output as (installed, version, gpu_offload, problem); garbled: (True, None, None, why).

    Also accepts a bare 'True'/'False', what `print(llama_cpp.llama_supports_gpu_offload())` writes.
    """
    lines = [line.strip() for line in stdout.splitlines() if line.strip()]
    if not lines:
        return True, None, None, "it printed nothing"
    last = lines[-1]  # llama.cpp may log before our line
    if last in ("True", "False"):
        return True, None, last == "True", ""
    try:
        answer = json.loads(last)
    except ValueError:
        return True, None, None, f"unexpected answer {last[:80]!r}"
    if not isinstance(answer, dict):
        return True, None, None, f"unexpected answer {last[:80]!r}"
    if not answer.get("installed", True):
        return False, None, None, str(answer.get("error") or "llama_cpp cannot be imported")
    version = answer.get("version")
    offload = answer.get("gpu_offload")
    if not isinstance(offload, bool):
        return True, None, None, f"unexpected answer {last[:80]!r}"
    return True, version if isinstance(version, str) else None, offload, ""


def parse_list_devices(output: str) -> tuple[str, ...]:
    """The GPU devices in llama-server's `--list-devices` output, in order; () for a CPU build ('(none)')."""
    devices = []
    listing = False
    for line in output.splitlines():
        if line.strip().startswith("Available devices"):
            listing = True
            continue
        if listing:
            match = _DEVICE_ROW.match(line)
            if match is None:
                if line.strip() and not line.startswith((" ", "\t")):
                    listing = False  # a log line after the listing ends it
                continue
            devices.append(f"{match.group(1)}{match.group(2)}: {match.group(3)}")
    return tuple(devices)


def parse_server_version(output: str) -> str | None:
    """'0.5.0-dev (build 1, commit 0c1e570)' from llama-server's `--version` (it writes to stderr)."""
    match = _VERSION.search(output)
    return match.group(1) if match else None


def cuda_init_failure(output: str) -> str:
    """Why a CUDA build found no GPU, from ggml's log ('no CUDA-capable device is detected'); '' when it did not say."""
    match = _CUDA_INIT_FAILED.search(output)
    return match.group(1) if match else ""


def nvidia_devices(build: EngineBuild) -> int | None:
    """How many of the NVIDIA GPUs the build can use: counted for llama-server, None = all (llama-cpp-python)."""
    if build.engine == LLAMA_SERVER:
        return sum(1 for d in build.devices if _backend(d) in NVIDIA_BACKENDS)
    return None


def unused_gpus(build: EngineBuild, gpu_count: int) -> int:
    """How many of the gpu_count GPUs the probe sees this build leaves unused (0 when it cannot be told)."""
    if gpu_count <= 0 or not build.installed or build.gpu_offload is None:
        return 0
    if not build.gpu_offload:
        return gpu_count
    seen = nvidia_devices(build)
    return 0 if seen is None else max(gpu_count - seen, 0)


def unused_gpu_warning(build: EngineBuild, gpu_count: int) -> str | None:
    """'engine llama-server is a CPU build: 2 GPUs unused', or None when the build uses every GPU (or is absent)."""
    unused = unused_gpus(build, gpu_count)
    if unused == 0:
        return None
    gpus = f"{unused} GPU{'s' if unused != 1 else ''} unused"
    if build.gpu_offload:
        return f"engine {build.engine} sees {gpu_count - unused} of {gpu_count} GPUs: {gpus}"
    if build.problem:  # a GPU build that found no GPU says why
        return f"engine {build.engine} cannot reach the GPUs ({build.problem}): {gpus}"
    return f"engine {build.engine} is a CPU build: {gpus}"


def plans_cpu_only(builds: Iterable[EngineBuild], gpu_count: int) -> bool:
    """True when GPUs are there but no engine build in use can offload to any: placement must plan for the CPU."""
    asked = [b for b in builds if b.installed and b.gpu_offload is not None]
    return gpu_count > 0 and bool(asked) and all(unused_gpus(b, gpu_count) == gpu_count for b in asked)


def probe_llama_cpp_python(python: str, timeout_s: float = ASK_TIMEOUT_S) -> EngineBuild:
    """Ask python's llama-cpp-python whether it can offload to a GPU (`llama_supports_gpu_offload()`)."""
    try:
        done = subprocess.run([python, "-c", OFFLOAD_QUERY], capture_output=True, text=True, timeout=timeout_s,
                              check=False, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        return EngineBuild(LLAMA_CPP_PYTHON, python, installed=False, problem=f"no interpreter at {python}")
    except (OSError, subprocess.TimeoutExpired) as exc:
        return EngineBuild(LLAMA_CPP_PYTHON, python, installed=True, problem=_failure(exc, timeout_s))
    installed, version, offload, problem = parse_offload_answer(done.stdout)
    if done.returncode != 0 and offload is None and installed:
        problem = f"exit status {done.returncode}: {_tail(done.stderr)}"
    return EngineBuild(LLAMA_CPP_PYTHON, python, installed, version, offload, (), problem)


def probe_llama_server(binary: Path | None, timeout_s: float = ASK_TIMEOUT_S) -> EngineBuild:
    """Run `llama-server --list-devices` (and `--version`); None = no binary found, an EngineBuild saying so."""
    if binary is None:
        return EngineBuild(LLAMA_SERVER, "-", installed=False, problem="no llama-server found")
    try:
        listed = subprocess.run([str(binary), "--list-devices"], capture_output=True, text=True, timeout=timeout_s,
                                check=False, stdin=subprocess.DEVNULL)
        versioned = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=timeout_s,
                                   check=False, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        return EngineBuild(LLAMA_SERVER, str(binary), installed=False, problem=f"{binary} does not exist")
    except (OSError, subprocess.TimeoutExpired) as exc:
        return EngineBuild(LLAMA_SERVER, str(binary), installed=True, problem=_failure(exc, timeout_s))
    version = parse_server_version(versioned.stdout + versioned.stderr)
    output = listed.stdout + "\n" + listed.stderr
    if "Available devices" not in output:
        why = f"--list-devices: exit status {listed.returncode}: {_tail(listed.stderr or listed.stdout)}"
        return EngineBuild(LLAMA_SERVER, str(binary), True, version, None, (), why)
    devices = parse_list_devices(output)
    return EngineBuild(LLAMA_SERVER, str(binary), True, version, bool(devices), devices, cuda_init_failure(output))


def probe_builds(kinds: Iterable[str], python: str, llama_server: Path | None) -> tuple[EngineBuild, ...]:
    """Ask the builds of the engine kinds in use (llama-cpp-python in python; the llama-server binary found)."""
    kinds = set(kinds)
    found = []
    if LLAMA_CPP_PYTHON in kinds:
        found.append(probe_llama_cpp_python(python))
    if LLAMA_SERVER in kinds:
        found.append(probe_llama_server(llama_server))
    return tuple(found)


def engine_warnings(builds: Sequence[EngineBuild], gpu_count: int) -> list[str]:
    """The warning for every build that leaves GPUs unused, for the log, `hybridd status` and `hybridd doctor`."""
    return [w for w in (unused_gpu_warning(b, gpu_count) for b in builds) if w]


def _backend(device: str) -> str:
    match = re.match(r"[A-Za-z]+", device)
    return match.group(0) if match else device


def _failure(exc: BaseException, timeout_s: float) -> str:
    if isinstance(exc, subprocess.TimeoutExpired):
        return f"no answer in {timeout_s:g} s"
    return f"cannot run it: {getattr(exc, 'strerror', None) or exc}"


def _tail(text: str, limit: int = 200) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "no output")[:limit]
