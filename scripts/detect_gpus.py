#!/usr/bin/env python3
"""Decide, before anything is installed, whether this machine's engines are built for CUDA or for the CPU.

Standard library only: scripts/setup.sh runs it with the system python before .venv holds anything.

    GPUs (nvidia-smi) + a CUDA toolkit (nvcc) new enough for them -> CUDA, for exactly their architectures
    GPUs but no toolkit, or one too old for them                   -> CPU, with the command that installs one
    no GPU, no driver, or nvidia-smi failing                       -> CPU

HYBRIDD_BUILD=cpu|cuda|auto overrides the choice (cuda still needs nvcc); HYBRIDD_CUDA_ARCHS="90;120" overrides the
architectures. It prints what it chose and why; `--shell` prints the choice as shell assignments on stdout (the
explanation then goes to stderr) for setup.sh to eval, `--json` as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field

QUERY = ["--query-gpu=name,compute_cap,memory.total", "--format=csv,noheader"]
TIMEOUT_S = 30.0
# The first CUDA release whose nvcc compiles for each architecture (CUDA's release notes): Ada 11.8, Hopper 11.8,
# Blackwell data centre 12.8, RTX 50 / RTX PRO 12.8, GB10 (DGX Spark) 12.9. CUDA 13 dropped Maxwell, Pascal and Volta.
MIN_CUDA = {"75": (10, 0), "80": (11, 0), "86": (11, 1), "87": (11, 4), "89": (11, 8), "90": (11, 8),
            "100": (12, 8), "101": (12, 8), "103": (12, 9), "110": (13, 0), "120": (12, 8), "121": (12, 9)}
LAST_CUDA_BELOW_75 = (12, 9)
# Old drivers print "[N/A]" for compute_cap; these names still tell it.
ARCH_BY_NAME = (("GB10", "121"), ("RTX PRO 6000 Blackwell", "120"), ("RTX 50", "120"), ("H100", "90"),
                ("H200", "90"), ("GH200", "90"), ("RTX 40", "89"), ("L40", "89"), ("L4", "89"), ("A100", "80"))
CHOICES = ("auto", "cpu", "cuda")
# A cmake CUDA architecture, as hybridd.engine.build checks it: sm_50 and newer without a leading zero (89, 120,
# 121), nvcc's arch-specific "a" forms from 90 (90a, 120a) and its family "f" forms from 100 (100f).
CUDA_ARCH = re.compile(r"[5-8]\d|(?:9\d|[1-9]\d\d)a?|[1-9]\d\df")


def split_archs(text: str) -> list[str]:
    """HYBRIDD_CUDA_ARCHS's items: ';', ',' or spaces separate them."""
    return [arch for arch in re.split(r"[;, ]+", text.strip()) if arch]


@dataclass(frozen=True)
class Gpu:
    """One row of nvidia-smi: the name, the architecture as cmake writes it ('89'; '' when unknown), memory."""

    name: str
    arch: str
    memory: str


@dataclass
class Decision:
    """What to build and why; build 'cuda' with no cuda_archs lets cmake pick (see cmake_args)."""

    build: str  # "cpu" or "cuda"
    cuda_archs: tuple[str, ...] = ()
    gpus: tuple[Gpu, ...] = ()
    nvcc: str = ""
    nvcc_version: str = ""
    reasons: list[str] = field(default_factory=list)
    install_toolkit: list[str] = field(default_factory=list)  # commands, when GPUs lack a (new enough) toolkit
    warning: str = ""

    @property
    def cmake_args(self) -> str:
        """CMAKE_ARGS for llama-cpp-python's build."""
        if self.build != "cuda":
            return "-DGGML_CUDA=off"
        if self.cuda_archs:
            return f"-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES={';'.join(self.cuda_archs)}"
        # GPUs whose architecture nvidia-smi did not tell: cmake asks them; no GPU at all: llama.cpp's default list
        return "-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=native" if self.gpus else "-DGGML_CUDA=on"


def parse_gpus(text: str) -> tuple[Gpu, ...]:
    """nvidia-smi's 'name, compute_cap, memory.total' CSV rows as Gpus; blank and garbled rows are skipped."""
    gpus = []
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.rsplit(",", 2)]
        if len(cells) != 3 or not cells[0]:
            continue
        name, cap, memory = cells
        match = re.fullmatch(r"(\d+)\.(\d+)", cap)
        arch = match.group(1) + match.group(2) if match else _arch_from_name(name)
        gpus.append(Gpu(name, arch, memory))
    return tuple(gpus)


def _arch_from_name(name: str) -> str:
    for fragment, arch in ARCH_BY_NAME:
        if fragment in name:
            return arch
    return ""


def parse_nvcc_version(text: str) -> tuple[int, int] | None:
    """(13, 0) from `nvcc --version`'s 'Cuda compilation tools, release 13.0, V13.0.88'."""
    match = re.search(r"release (\d+)\.(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else None


def unsupported_archs(archs: tuple[str, ...], version: tuple[int, int]) -> list[str]:
    """The architectures that nvcc `version` cannot compile for."""
    dropped = version > LAST_CUDA_BELOW_75
    plain = {arch: arch.rstrip("af") for arch in archs}  # 90a needs what 90 needs
    return [arch for arch in archs
            if (dropped and int(plain[arch]) < 75) or version < MIN_CUDA.get(plain[arch], (0, 0))]


def toolkit_commands(machine: str, os_release: dict[str, str], archs: tuple[str, ...]) -> list[str]:
    """The commands that install a CUDA toolkit new enough for archs, on this distribution; then a rerun."""
    major, minor = max((MIN_CUDA.get(a.rstrip("af"), (12, 0)) for a in archs), default=(12, 0))
    package = "cuda-toolkit-13-0" if (major, minor) <= (13, 0) else f"cuda-toolkit-{major}-{minor}"
    distro = os_release.get("ID", "")
    version = os_release.get("VERSION_ID", "").replace(".", "")
    repo_arch = "sbsa" if machine in ("aarch64", "arm64") else "x86_64"
    rerun = "then run scripts/setup.sh again (or: hybridd engines build llama-cpp-python --cuda)"
    if distro in ("ubuntu", "debian") and version:
        keyring = (f"https://developer.download.nvidia.com/compute/cuda/repos/{distro}{version}/{repo_arch}/"
                   "cuda-keyring_1.1-1_all.deb")
        return [f"wget {keyring}",
                f"sudo dpkg -i cuda-keyring_1.1-1_all.deb && sudo apt-get update && sudo apt-get install -y {package}",
                "export PATH=/usr/local/cuda/bin:$PATH", rerun]
    return [f"install {package} from https://developer.nvidia.com/cuda-downloads (or your distribution's CUDA "
            "toolkit package)", "export PATH=/usr/local/cuda/bin:$PATH", rerun]


def decide(gpus: tuple[Gpu, ...], smi_problem: str, nvcc: str, nvcc_text: str, choice: str = "auto",
           arch_override: str = "", machine: str = "x86_64", os_release: dict[str, str] | None = None) -> Decision:
    """The build for this machine, from what nvidia-smi and nvcc said (pure)."""
    archs = tuple(sorted({g.arch for g in gpus if g.arch}, key=int))
    if arch_override.strip():
        archs = tuple(split_archs(arch_override))
    version = parse_nvcc_version(nvcc_text) if nvcc else None
    shown = f"{version[0]}.{version[1]}" if version else ""
    decision = Decision("cpu", (), gpus, nvcc, shown)
    why = decision.reasons
    if gpus:
        listed = "; ".join(f"{g.name} (sm_{g.arch or '?'}, {g.memory})" for g in gpus)
        why.append(f"nvidia-smi shows {len(gpus)} GPU{'s' if len(gpus) != 1 else ''}: {listed}")
    else:
        why.append(smi_problem or "nvidia-smi lists no GPU")
    if nvcc:
        why.append(f"CUDA toolkit: {nvcc} (release {shown or 'unknown'})")
    else:
        why.append("no CUDA toolkit: nvcc is not on PATH, in $CUDACXX or in $CUDA_HOME/bin")
    if choice == "cpu":
        why.append("HYBRIDD_BUILD=cpu: building for the CPU")
    elif choice == "cuda":
        if not nvcc:
            why.append("HYBRIDD_BUILD=cuda needs the CUDA toolkit: building for the CPU instead")
            decision.install_toolkit = toolkit_commands(machine, os_release or {}, archs)
        else:
            decision.build, decision.cuda_archs = "cuda", archs
            why.append("HYBRIDD_BUILD=cuda: building for CUDA")
    elif gpus and not nvcc:
        why.append("GPUs without a CUDA toolkit: building for the CPU")
        decision.install_toolkit = toolkit_commands(machine, os_release or {}, archs)
    elif gpus:
        too_new = unsupported_archs(archs, version) if version else []
        if too_new:
            why.append(f"nvcc {shown} cannot compile for {', '.join('sm_' + a for a in too_new)}: building for the "
                       "CPU until a newer toolkit is installed")
            decision.install_toolkit = toolkit_commands(machine, os_release or {}, archs)
        else:
            decision.build, decision.cuda_archs = "cuda", archs
    if decision.build == "cuda":
        where = ", ".join(f"sm_{a}" for a in decision.cuda_archs) or (
            "the GPUs' own architectures (cmake's 'native')" if gpus else "llama.cpp's default architectures")
        why.append(f"chose CUDA for {where}: CMAKE_ARGS=\"{decision.cmake_args}\"")
    else:
        why.append("chose the CPU build")
        if gpus:
            n = len(gpus)
            decision.warning = (f"the engines will be CPU builds: {n} GPU{'s' if n != 1 else ''} unused; hybridd "
                                "serve, hybridd status and hybridd doctor warn until they are rebuilt for CUDA")
    return decision


# ---- I/O at the edges -------------------------------------------------------------------------------------------


def query_gpus(env: dict[str, str]) -> tuple[tuple[Gpu, ...], str]:
    """The GPUs nvidia-smi lists, or () and why not."""
    smi = shutil.which("nvidia-smi", path=env.get("PATH"))
    if smi is None:
        return (), "no nvidia-smi on PATH: no NVIDIA driver"
    try:
        done = subprocess.run([smi, *QUERY], capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
                              env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return (), f"nvidia-smi gave no answer in {TIMEOUT_S:g} s: treating this machine as having no usable GPU"
    except OSError as exc:
        return (), f"nvidia-smi cannot run ({exc.strerror or exc}): treating this machine as having no usable GPU"
    if done.returncode != 0:
        said = (done.stdout + done.stderr).strip().splitlines()
        return (), (f"nvidia-smi failed (exit {done.returncode}: {said[0][:160] if said else 'no output'}): the "
                    "driver is not working, treating this machine as having no usable GPU")
    gpus = parse_gpus(done.stdout)
    return gpus, "" if gpus else "nvidia-smi lists no GPU"


def find_nvcc(env: dict[str, str]) -> str:
    """nvcc from $CUDACXX, PATH, or $CUDA_HOME/bin (default /usr/local/cuda); '' when there is none."""
    cuda_home = env.get("CUDA_HOME") or env.get("CUDA_PATH") or "/usr/local/cuda"
    for candidate in (env.get("CUDACXX"), shutil.which("nvcc", path=env.get("PATH")),
                      os.path.join(cuda_home, "bin", "nvcc")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return ""


def nvcc_text(nvcc: str, env: dict[str, str]) -> str:
    if not nvcc:
        return ""
    try:
        done = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
                              env=env, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout + done.stderr


def read_os_release(path: str = "/etc/os-release") -> dict[str, str]:
    found = {}
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                key, sep, value = line.strip().partition("=")
                if sep:
                    found[key] = value.strip().strip('"')
    except OSError:
        pass
    return found


def explain(decision: Decision) -> list[str]:
    """The lines printed for a person."""
    lines = [f"setup: {reason}" for reason in decision.reasons]
    if decision.install_toolkit:
        lines.append("setup: to build for the GPUs, install the CUDA toolkit:")
        lines.extend(f"    {command}" for command in decision.install_toolkit)
    if decision.warning:
        lines.append(f"setup: WARNING: {decision.warning}")
    return lines


def shell_assignments(decision: Decision) -> list[str]:
    """The decision as POSIX shell assignments for `eval`."""
    values = {
        "HYBRIDD_BUILD_CHOICE": decision.build,
        "HYBRIDD_CUDA_ARCHS": ";".join(decision.cuda_archs),
        "HYBRIDD_CMAKE_ARGS": decision.cmake_args,
        "HYBRIDD_NVCC": decision.nvcc,
        "HYBRIDD_GPU_COUNT": str(len(decision.gpus)),
    }
    return [f"{key}={shlex.quote(value)}" for key, value in values.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--shell", action="store_true", help="shell assignments on stdout, the explanation on stderr")
    form.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)
    env = dict(os.environ)
    choice = env.get("HYBRIDD_BUILD", "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        print(f"detect_gpus: HYBRIDD_BUILD: unknown build {choice!r} (valid: {', '.join(CHOICES)})", file=sys.stderr)
        return 2
    override = env.get("HYBRIDD_CUDA_ARCHS", "")
    bad = [arch for arch in split_archs(override) if not CUDA_ARCH.fullmatch(arch)]
    if bad:
        print(f"detect_gpus: HYBRIDD_CUDA_ARCHS: {bad[0]!r} is not a CUDA architecture (valid: compute capabilities "
              "without the dot, separated by ';', e.g. 89;120 or 90a)", file=sys.stderr)
        return 2
    gpus, problem = query_gpus(env)
    nvcc = find_nvcc(env)
    decision = decide(gpus, problem, nvcc, nvcc_text(nvcc, env), choice, env.get("HYBRIDD_CUDA_ARCHS", ""),
                      platform.machine(), read_os_release())
    if args.json:
        body = asdict(decision)
        body["cmake_args"] = decision.cmake_args
        print(json.dumps(body, indent=2))
        return 0
    text = "\n".join(explain(decision))
    if args.shell:
        print(text, file=sys.stderr)
        print("\n".join(shell_assignments(decision)))
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
