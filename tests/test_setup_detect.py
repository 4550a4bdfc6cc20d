"""scripts/detect_gpus.py and scripts/setup.sh's choice, against fake `nvidia-smi` and `nvcc` executables on PATH.

The detection script runs as setup.sh runs it: a subprocess of a bare interpreter (`-S`: no site-packages, so a
stray import of anything outside the standard library fails here). setup.sh runs with `--print-plan`, which shows
the commands it would run and compiles nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DETECT = REPO / "scripts" / "detect_gpus.py"
SETUP = REPO / "scripts" / "setup.sh"

DESKTOP = "NVIDIA GeForce RTX 4090, 8.9, 24564 MiB\nNVIDIA GeForce RTX 5070 Ti, 12.0, 16303 MiB\n"
SPARK = "NVIDIA GB10, 12.1, [N/A]\n"
NVCC_13 = ("nvcc: NVIDIA (R) Cuda compiler driver\nCopyright (c) 2005-2025 NVIDIA Corporation\n"
           "Cuda compilation tools, release 13.0, V13.0.88\nBuild cuda_13.0.r13.0/compiler.36424714_0\n")
NVCC_12_4 = "nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 12.4, V12.4.131\n"
SMI_BROKEN = ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make sure that the "
              "latest NVIDIA driver is installed and running.\n")


def _script(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def fake_smi(bin_dir: Path, rows: str, status: int = 0) -> Path:
    """An nvidia-smi that answers the detection's query with rows (on stdout, or stderr when it fails)."""
    stream = "" if status == 0 else " >&2"
    return _script(bin_dir, "nvidia-smi", f"cat <<'EOF'{stream}\n{rows}EOF\nexit {status}\n")


def fake_nvcc(bin_dir: Path, version_text: str = NVCC_13) -> Path:
    return _script(bin_dir, "nvcc", f"cat <<'EOF'\n{version_text}EOF\n")


def env_with(bin_dir: Path, tmp_path: Path, **extra: str) -> dict[str, str]:
    """A clean environment: only bin_dir and the system folders on PATH, no real CUDA toolkit to find."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("CUDACXX", "CUDA_HOME", "CUDA_PATH", "HYBRIDD_BUILD", "HYBRIDD_CUDA_ARCHS")}
    env.update({"PATH": f"{bin_dir}:/usr/bin:/bin", "CUDA_HOME": str(tmp_path / "no-cuda"), **extra})
    return env


def detect(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-S", str(DETECT), *args], capture_output=True, text=True, env=env,
                          timeout=60, check=False)


def shell_vars(env: dict[str, str]) -> dict[str, str]:
    """The assignments `--shell` prints, as bash would see them after eval."""
    done = detect(env, "--shell")
    assert done.returncode == 0, done.stderr
    dump = subprocess.run(["bash", "-c", 'eval "$1"; for v in HYBRIDD_BUILD_CHOICE HYBRIDD_CUDA_ARCHS '
                           'HYBRIDD_CMAKE_ARGS HYBRIDD_NVCC HYBRIDD_GPU_COUNT; do printf "%s=%s\\n" "$v" "${!v}"; '
                           'done', "-", done.stdout], capture_output=True, text=True, check=True)
    return dict(line.split("=", 1) for line in dump.stdout.splitlines())


def test_two_gpus_and_a_toolkit_build_cuda_for_exactly_their_architectures(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    fake_smi(bin_dir, DESKTOP)
    nvcc = fake_nvcc(bin_dir)
    env = env_with(bin_dir, tmp_path)
    done = detect(env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "setup: nvidia-smi shows 2 GPUs: NVIDIA GeForce RTX 4090 (sm_89, 24564 MiB); "
        "NVIDIA GeForce RTX 5070 Ti (sm_120, 16303 MiB)",
        f"setup: CUDA toolkit: {nvcc} (release 13.0)",
        'setup: chose CUDA for sm_89, sm_120: CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=89;120"',
    ]
    assert shell_vars(env) == {"HYBRIDD_BUILD_CHOICE": "cuda", "HYBRIDD_CUDA_ARCHS": "89;120",
                               "HYBRIDD_CMAKE_ARGS": "-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=89;120",
                               "HYBRIDD_NVCC": str(nvcc), "HYBRIDD_GPU_COUNT": "2"}


def test_gpus_without_a_toolkit_build_for_the_cpu_and_say_how_to_install_one(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    fake_smi(bin_dir, DESKTOP)
    env = env_with(bin_dir, tmp_path)
    done = detect(env)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "setup: no CUDA toolkit: nvcc is not on PATH, in $CUDACXX or in $CUDA_HOME/bin" in out
    assert "setup: GPUs without a CUDA toolkit: building for the CPU" in out
    assert "setup: chose the CPU build" in out
    assert "setup: to build for the GPUs, install the CUDA toolkit:" in out
    assert "apt-get install -y cuda-toolkit-13-0" in out or "cuda-downloads" in out
    assert ("setup: WARNING: the engines will be CPU builds: 2 GPUs unused; hybridd serve, hybridd status and "
            "hybridd doctor warn until they are rebuilt for CUDA") in out
    assert shell_vars(env)["HYBRIDD_CMAKE_ARGS"] == "-DGGML_CUDA=off"


def test_no_gpu_builds_for_the_cpu_without_warning(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    fake_nvcc(bin_dir)  # a toolkit alone changes nothing
    env = env_with(bin_dir, tmp_path)
    done = detect(env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "setup: no nvidia-smi on PATH: no NVIDIA driver"
    assert done.stdout.splitlines()[-1] == "setup: chose the CPU build"
    assert "WARNING" not in done.stdout and "install the CUDA toolkit" not in done.stdout
    assert shell_vars(env)["HYBRIDD_BUILD_CHOICE"] == "cpu"


def test_a_gb10_builds_for_sm_121(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    fake_smi(bin_dir, SPARK)
    fake_nvcc(bin_dir)
    env = env_with(bin_dir, tmp_path)
    done = detect(env, "--json")
    assert done.returncode == 0, done.stderr
    decision = json.loads(done.stdout)
    assert decision["build"] == "cuda" and decision["cuda_archs"] == ["121"]
    assert decision["gpus"] == [{"name": "NVIDIA GB10", "arch": "121", "memory": "[N/A]"}]
    assert decision["cmake_args"] == "-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=121"


def test_a_failing_nvidia_smi_means_no_usable_gpu(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    fake_smi(bin_dir, SMI_BROKEN, status=9)
    fake_nvcc(bin_dir)
    env = env_with(bin_dir, tmp_path)
    done = detect(env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == (
        "setup: nvidia-smi failed (exit 9: NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA "
        "driver. Make sure that the latest NVIDIA driver is installed and running.): the driver is not working, "
        "treating this machine as having no usable GPU")
    assert shell_vars(env)["HYBRIDD_BUILD_CHOICE"] == "cpu"


def test_a_toolkit_too_old_for_the_gpus_builds_for_the_cpu(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    fake_smi(bin_dir, DESKTOP)
    fake_nvcc(bin_dir, NVCC_12_4)  # Blackwell (sm_120) needs CUDA 12.8
    done = detect(env_with(bin_dir, tmp_path))
    assert "setup: nvcc 12.4 cannot compile for sm_120: building for the CPU until a newer toolkit is installed" \
        in done.stdout
    assert "setup: chose the CPU build" in done.stdout
    assert "install the CUDA toolkit" in done.stdout


def test_overrides_choose_the_build_and_the_architectures(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    fake_smi(bin_dir, DESKTOP)
    fake_nvcc(bin_dir)
    assert shell_vars(env_with(bin_dir, tmp_path, HYBRIDD_BUILD="cpu"))["HYBRIDD_BUILD_CHOICE"] == "cpu"
    forced = shell_vars(env_with(bin_dir, tmp_path, HYBRIDD_CUDA_ARCHS="90"))
    assert forced["HYBRIDD_CMAKE_ARGS"] == "-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90"
    suffixed = shell_vars(env_with(bin_dir, tmp_path, HYBRIDD_CUDA_ARCHS="90a;121"))
    assert suffixed["HYBRIDD_CMAKE_ARGS"] == "-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90a;121"
    bad = detect(env_with(bin_dir, tmp_path, HYBRIDD_CUDA_ARCHS="8.9"), "--shell")
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "detect_gpus: HYBRIDD_CUDA_ARCHS: '8.9' is not a CUDA architecture (valid: compute capabilities without the "
        "dot, separated by ';', e.g. 89;120 or 90a)")
    wrong = detect(env_with(bin_dir, tmp_path, HYBRIDD_BUILD="rocm"), "--shell")
    assert wrong.returncode == 2
    assert wrong.stderr.strip() == "detect_gpus: HYBRIDD_BUILD: unknown build 'rocm' (valid: auto, cpu, cuda)"


def test_the_toolkit_is_found_in_cuda_home_when_it_is_not_on_path(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    fake_smi(bin_dir, DESKTOP)
    nvcc = fake_nvcc(tmp_path / "cuda" / "bin")
    found = shell_vars(env_with(bin_dir, tmp_path, CUDA_HOME=str(tmp_path / "cuda")))
    assert found["HYBRIDD_BUILD_CHOICE"] == "cuda" and found["HYBRIDD_NVCC"] == str(nvcc)


def print_plan(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(["bash", str(SETUP), *args, "--print-plan"], capture_output=True, text=True, env=env,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.skipif(not (REPO / ".venv" / "bin" / "python").exists(), reason="needs .venv (scripts/setup.sh)")
def test_setup_on_a_gpu_box_rebuilds_llama_cpp_python_for_cuda_bypassing_the_cache(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    fake_smi(bin_dir, DESKTOP)
    nvcc = fake_nvcc(bin_dir)
    plan = print_plan(env_with(bin_dir, tmp_path, PYTHON=sys.executable), "test")
    assert plan.splitlines()[0] == "setup plan (test): cuda build for CUDA architectures 89;120"
    # The suite's .venv holds a CPU llama-cpp-python: the plan reinstalls exactly that version from source.
    reinstall = next(line for line in plan.splitlines() if "--force-reinstall" in line)
    assert reinstall.startswith("  would run: env 'CMAKE_ARGS=-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=89;120' "
                                "CMAKE_BUILD_PARALLEL_LEVEL=")
    assert f"CUDACXX={nvcc} " in reinstall
    assert reinstall.endswith("-m pip install --no-cache-dir --no-binary llama-cpp-python --force-reinstall "
                              "--no-deps llama-cpp-python==" + _installed_llama_version())
    assert "  would check: llama_cpp.llama_supports_gpu_offload() is True" in plan
    # llama-server is built for the architectures setup chose, passed on (the eval'd variable is not exported)
    assert plan.splitlines()[-1].endswith("-m hybridd.cli.engines build llama-server --cuda --cuda-archs '89;120'")
    forced = print_plan(env_with(bin_dir, tmp_path, PYTHON=sys.executable, HYBRIDD_CUDA_ARCHS="121, 90a"))
    assert forced.splitlines()[0] == "setup plan (serve): cuda build for CUDA architectures 121;90a"
    assert forced.splitlines()[-1].endswith("build llama-server --cuda --cuda-archs '121;90a'")
    # The desktop tests' programs come first: PyGObject, in the tray extra, compiles against them.
    lines = plan.splitlines()
    desktop = lines.index("  would run: scripts/install_desktop.sh")
    extras = next(i for i, line in enumerate(lines) if "-e '.[dev,train,tray]'" in line)
    assert desktop < extras


@pytest.mark.skipif(not (REPO / ".venv" / "bin" / "python").exists(), reason="needs .venv (scripts/setup.sh)")
def test_setup_on_a_cpu_box_keeps_the_cached_cpu_install(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    plan = print_plan(env_with(bin_dir, tmp_path, PYTHON=sys.executable))
    assert plan.splitlines()[0] == "setup plan (serve): cpu build"
    assert "--force-reinstall" not in plan and "CMAKE_ARGS" not in plan and "--no-cache-dir" not in plan
    assert "  would check: llama_cpp.llama_supports_gpu_offload() is False" in plan
    # Serving builds llama-server too (the default engine where one is built), unless told not to.
    assert plan.splitlines()[-1].endswith("-m hybridd.cli.engines build llama-server --cpu")
    skipped = print_plan(env_with(bin_dir, tmp_path, PYTHON=sys.executable, HYBRIDD_LLAMA_SERVER="0"))
    assert "build llama-server" not in skipped
    test_plan = print_plan(env_with(bin_dir, tmp_path, PYTHON=sys.executable), "test")
    assert test_plan.splitlines()[-1].endswith("-m hybridd.cli.engines build llama-server --cpu")


def _installed_llama_version() -> str:
    done = subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-c",
                           "import importlib.metadata as m; print(m.version('llama-cpp-python'))"],
                          capture_output=True, text=True, check=True)
    return done.stdout.strip()
