"""Engine builds: what each can offload to, parsed from canned output and asked of real (scripted) child processes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hybridd.probe.engine_builds import (
    LLAMA_CPP_PYTHON,
    LLAMA_SERVER,
    EngineBuild,
    cuda_init_failure,
    engine_warnings,
    parse_list_devices,
    parse_offload_answer,
    parse_server_version,
    plans_cpu_only,
    probe_builds,
    probe_llama_cpp_python,
    probe_llama_server,
    unused_gpu_warning,
)

# What a CPU build of llama-server (llama.cpp b6000s, as `hybridd engines build` makes it) prints.
CPU_LIST = "Available devices:\n  (none)\n"
# A CUDA build on a two-GPU desktop: ggml's log on stderr, the listing on stdout.
CUDA_LIST = ("ggml_cuda_init: found 2 CUDA devices:\n"
             "  Device 0: NVIDIA GeForce RTX 4090, compute capability 8.9, VMM: yes\n"
             "  Device 1: NVIDIA GeForce RTX 5070 Ti, compute capability 12.0, VMM: yes\n"
             "Available devices:\n"
             "  CUDA0: NVIDIA GeForce RTX 4090 (24080 MiB, 23661 MiB free)\n"
             "  CUDA1: NVIDIA GeForce RTX 5070 Ti (15841 MiB, 15520 MiB free)\n")
CUDA_NO_DEVICE = ("ggml_cuda_init: failed to initialize CUDA: no CUDA-capable device is detected\n"
                  "Available devices:\n  (none)\n")
VERSION = "version: 0.5.0-dev (build 1, commit 0c1e570)\nbuilt with GNU 12.2.0 for Linux x86_64\n"


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def test_a_cpu_build_lists_no_device() -> None:
    assert parse_list_devices(CPU_LIST) == ()


def test_a_cuda_build_lists_its_gpus_not_ggml_log_lines() -> None:
    assert parse_list_devices(CUDA_LIST) == ("CUDA0: NVIDIA GeForce RTX 4090 (24080 MiB, 23661 MiB free)",
                                             "CUDA1: NVIDIA GeForce RTX 5070 Ti (15841 MiB, 15520 MiB free)")


def test_a_cuda_build_that_found_no_gpu_says_why() -> None:
    assert parse_list_devices(CUDA_NO_DEVICE) == ()
    assert cuda_init_failure(CUDA_NO_DEVICE) == "no CUDA-capable device is detected"
    assert cuda_init_failure(CPU_LIST) == ""


def test_the_server_version_line() -> None:
    assert parse_server_version(VERSION) == "0.5.0-dev (build 1, commit 0c1e570)"
    assert parse_server_version("nothing") is None


def test_offload_answers() -> None:
    assert parse_offload_answer('{"installed": true, "version": "0.3.36", "gpu_offload": false}\n') == \
        (True, "0.3.36", False, "")
    assert parse_offload_answer("llama.cpp logs first\nTrue\n") == (True, None, True, "")
    assert parse_offload_answer('{"installed": false, "error": "No module named \'llama_cpp\'"}') == \
        (False, None, None, "No module named 'llama_cpp'")
    assert parse_offload_answer("") == (True, None, None, "it printed nothing")
    assert parse_offload_answer("Segmentation fault")[2] is None


def test_warnings_name_the_build_and_the_unused_gpus() -> None:
    cpu_python = EngineBuild(LLAMA_CPP_PYTHON, "/usr/bin/python3", True, "0.3.36", False)
    cpu_server = EngineBuild(LLAMA_SERVER, "/bin/llama-server", True, "x", False)
    one_gpu = EngineBuild(LLAMA_SERVER, "/bin/llama-server", True, "x", True, ("CUDA0: NVIDIA GeForce RTX 4090",))
    no_device = EngineBuild(LLAMA_SERVER, "/bin/llama-server", True, "x", False, (),
                            "no CUDA-capable device is detected")
    assert unused_gpu_warning(cpu_python, 2) == "engine llama-cpp-python is a CPU build: 2 GPUs unused"
    assert unused_gpu_warning(cpu_server, 1) == "engine llama-server is a CPU build: 1 GPU unused"
    assert unused_gpu_warning(one_gpu, 2) == "engine llama-server sees 1 of 2 GPUs: 1 GPU unused"
    assert unused_gpu_warning(no_device, 2) == ("engine llama-server cannot reach the GPUs (no CUDA-capable device "
                                                "is detected): 2 GPUs unused")
    assert unused_gpu_warning(cpu_python, 0) is None  # no GPU to leave unused
    assert unused_gpu_warning(one_gpu, 1) is None
    assert engine_warnings([cpu_python, one_gpu], 1) == ["engine llama-cpp-python is a CPU build: 1 GPU unused"]


def test_placement_plans_cpu_only_when_no_build_reaches_a_gpu() -> None:
    cpu = EngineBuild(LLAMA_CPP_PYTHON, "py", True, "0.3.36", False)
    gpu = EngineBuild(LLAMA_CPP_PYTHON, "py", True, "0.3.36", True)
    unknown = EngineBuild(LLAMA_SERVER, "-", True, None, None, (), "no answer in 60 s")
    absent = EngineBuild(LLAMA_SERVER, "-", False)
    assert plans_cpu_only([cpu, absent], 2)
    assert not plans_cpu_only([cpu, gpu], 2)
    assert not plans_cpu_only([unknown], 2)  # cannot tell: placement keeps the GPUs rather than guess
    assert not plans_cpu_only([cpu], 0)


def test_llama_cpp_python_is_asked_in_the_configured_interpreter(tmp_path: Path) -> None:
    python = _script(tmp_path / "python", 'echo "ggml log line"\n'
                     'echo \'{"installed": true, "version": "0.3.36", "gpu_offload": true}\'\n')
    found = probe_llama_cpp_python(str(python))
    assert found == EngineBuild(LLAMA_CPP_PYTHON, str(python), True, "0.3.36", True)
    assert found.backends == ("GPU", "CPU")


def test_a_bare_true_or_false_answer_is_understood(tmp_path: Path) -> None:
    python = _script(tmp_path / "python", "echo False\n")
    found = probe_llama_cpp_python(str(python))
    assert (found.installed, found.gpu_offload, found.backends) == (True, False, ("CPU",))


def test_an_interpreter_without_llama_cpp_or_missing_or_crashing(tmp_path: Path) -> None:
    missing = probe_llama_cpp_python(str(tmp_path / "nowhere" / "python"))
    assert not missing.installed and "no interpreter" in missing.problem
    crashing = probe_llama_cpp_python(str(_script(tmp_path / "python", "echo 'Illegal instruction' >&2\nexit 132\n")))
    assert crashing.installed and crashing.gpu_offload is None
    assert crashing.problem == "exit status 132: Illegal instruction"


def test_the_real_interpreter_answers(tmp_path: Path) -> None:
    found = probe_llama_cpp_python(sys.executable)  # the venv's llama-cpp-python: the CPU wheel on CI
    assert found.installed and found.version and found.gpu_offload is not None


def test_llama_server_is_asked_for_its_devices(tmp_path: Path) -> None:
    listing = tmp_path / "listing.txt"
    listing.write_text(CUDA_LIST)
    binary = _script(tmp_path / "llama-server",
                     f'case "$1" in --list-devices) cat {listing};; --version) printf "{VERSION}" >&2;; esac\n')
    found = probe_llama_server(binary)
    assert found.gpu_offload and found.version == "0.5.0-dev (build 1, commit 0c1e570)"
    assert found.backends == ("CUDA", "CPU")
    assert unused_gpu_warning(found, 2) is None
    assert found.describe().endswith("CUDA0: NVIDIA GeForce RTX 4090 (24080 MiB, 23661 MiB free), "
                                     "CUDA1: NVIDIA GeForce RTX 5070 Ti (15841 MiB, 15520 MiB free)")


def test_an_old_llama_server_without_list_devices_is_unknown(tmp_path: Path) -> None:
    binary = _script(tmp_path / "llama-server", "echo 'error: invalid argument: --list-devices' >&2\nexit 1\n")
    found = probe_llama_server(binary)
    assert found.installed and found.gpu_offload is None
    assert found.problem == "--list-devices: exit status 1: error: invalid argument: --list-devices"
    assert probe_llama_server(None).installed is False


def test_a_built_llama_server_when_there_is_one() -> None:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hybridd" / "engines"
    built = sorted(root.glob("llama-server-*-cpu/bin/llama-server"))
    if not built:
        return  # `hybridd engines build` has not run on this machine
    found = probe_llama_server(built[0])
    assert found.installed and found.gpu_offload is False and found.backends == ("CPU",)


def test_only_the_kinds_in_use_are_asked(tmp_path: Path) -> None:
    python = _script(tmp_path / "python", "echo False\n")
    assert [b.engine for b in probe_builds(["llama-cpp-python", "external"], str(python), None)] == [LLAMA_CPP_PYTHON]
    both = probe_builds(["llama-cpp-python", "llama-server"], str(python), None)
    assert [(b.engine, b.installed) for b in both] == [(LLAMA_CPP_PYTHON, True), (LLAMA_SERVER, False)]
    assert plans_cpu_only(both, 1)
