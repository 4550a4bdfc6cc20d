"""`hybridd engines build`'s decisions without compiling: where builds go, what cmake is told, when nothing is done."""

from __future__ import annotations

import argparse
import io
import itertools
import sys
import tarfile
import textwrap
import time
from importlib import metadata
from pathlib import Path

import pytest

from hybridd.cli import engines as engines_cli
from hybridd.config import ModelEntry
from hybridd.engine import build
from hybridd.engine.build import BuildTarget
from hybridd.engine.llamaserver import find_llama_server, llama_server_argv


def test_the_cache_follows_xdg_and_defaults_to_dot_cache() -> None:
    assert build.cache_root({"XDG_CACHE_HOME": "/x/cache", "HOME": "/home/u"}) == Path("/x/cache/hybridd/engines")
    assert build.cache_root({"XDG_CACHE_HOME": "", "HOME": "/home/u"}) == Path("/home/u/.cache/hybridd/engines")


def test_builds_are_named_by_version_and_device() -> None:
    root = Path("/c")
    cpu = BuildTarget("0.3.36")
    cuda = BuildTarget("0.3.36", ("89", "120"), cuda=True)
    assert build.binary_path(root, cpu) == Path("/c/llama-server-0.3.36-cpu/bin/llama-server")
    assert build.binary_path(root, cuda) == Path("/c/llama-server-0.3.36-cuda-sm_89-sm_120/bin/llama-server")
    assert BuildTarget("0.3.36", cuda=True).name == "llama-server-0.3.36-cuda"  # cmake picks the architectures
    assert build.build_dir(root, cpu) == Path("/c/build/llama-server-0.3.36-cpu")
    assert build.source_dir(root, "0.3.36") == Path("/c/src/llama_cpp_python-0.3.36/vendor/llama.cpp")


def test_compute_capabilities_become_cmake_architectures() -> None:
    assert build.cuda_architectures("12.0\n8.9\n8.9\n") == ("89", "120")
    assert build.cuda_architectures("12.1\n") == ("121",)
    assert build.cuda_architectures("") == ()
    assert build.cuda_architectures("NVIDIA-SMI has failed\n[N/A]\n") == ()
    target = build.resolve_target("0.3.36", cuda=True, compute_caps=lambda: "8.6\n12.0\n")
    assert target.variant == "cuda-sm_86-sm_120"
    assert build.resolve_target("0.3.36", cuda=False, compute_caps=lambda: "8.6\n") == BuildTarget("0.3.36")


def test_cuda_architectures_asked_for_are_validated_and_win_over_the_gpus() -> None:
    assert build.parse_cuda_archs("120;89", "HYBRIDD_CUDA_ARCHS") == ("89", "120")
    assert build.parse_cuda_archs(" 121 ; 90a;90, 89 ", "--cuda-archs") == ("89", "90", "90a", "121")
    for bad, word in (("8.9;12.0", "'8.9'"), ("sm_89", "'sm_89'"), ("89;native", "'native'")):
        with pytest.raises(build.BuildFailed) as caught:
            build.parse_cuda_archs(bad, "HYBRIDD_CUDA_ARCHS")
        assert str(caught.value) == (f"HYBRIDD_CUDA_ARCHS: {word} is not a CUDA architecture (valid: compute "
                                     "capabilities without the dot, separated by ';', e.g. 89;120 or 90a)")
    with pytest.raises(build.BuildFailed, match=r"^--cuda-archs: no CUDA architecture given \(valid: "):
        build.parse_cuda_archs(" ; ", "--cuda-archs")
    # the flag wins over the variable; an empty variable is unset
    env = {"HYBRIDD_CUDA_ARCHS": "89;120"}
    assert build.requested_archs(None, env) == (("89", "120"), "HYBRIDD_CUDA_ARCHS")
    assert build.requested_archs("121", env) == (("121",), "--cuda-archs")
    assert build.requested_archs(None, {"HYBRIDD_CUDA_ARCHS": " "}) is None
    assert build.requested_archs(None, {}) is None
    # asked-for architectures replace the GPUs' (nvidia-smi is not even asked), and reach cmake
    def no_smi() -> str:
        raise AssertionError("nvidia-smi asked although the architectures were given")

    target = build.resolve_target("0.3.36", cuda=True, compute_caps=no_smi, archs=("89", "120"))
    assert target.variant == "cuda-sm_89-sm_120"
    assert "-DCMAKE_CUDA_ARCHITECTURES=89;120" in build.configure_args(Path("/s"), Path("/b"), target)
    assert build.reinstall_cmake_args(target) == "-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=89;120"
    assert build.resolve_target("0.3.36", cuda=False, archs=("89",)) == BuildTarget("0.3.36")


def test_cmake_arguments_for_cpu_and_cuda() -> None:
    src, out = Path("/s"), Path("/b")
    cpu = build.configure_args(src, out, BuildTarget("0.3.36"))
    cuda = build.configure_args(src, out, BuildTarget("0.3.36", ("89", "120"), cuda=True))
    assert cpu[:6] == ["-S", "/s", "-B", "/b", "-G", "Ninja"]
    for flag in ("-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_SERVER=ON",
                 "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                 "-DLLAMA_USE_PREBUILT_UI=OFF"):
        assert flag in cpu and flag in cuda
    assert "-DGGML_CUDA=OFF" in cpu and not any(a.startswith("-DCMAKE_CUDA_ARCHITECTURES") for a in cpu)
    assert "-DGGML_CUDA=ON" in cuda and "-DCMAKE_CUDA_ARCHITECTURES=89;120" in cuda
    assert "-DCMAKE_CUDA_ARCHITECTURES" not in " ".join(
        build.configure_args(src, out, BuildTarget("0.3.36", cuda=True)))
    assert build.build_args(out, 6) == ["--build", "/b", "--target", "llama-server", "--config", "Release", "-j", "6"]


def test_pip_is_asked_for_exactly_the_installed_version() -> None:
    assert build.pip_download_argv("/py", "0.3.36", Path("/d")) == [
        "/py", "-m", "pip", "download", "llama-cpp-python==0.3.36", "--no-deps", "--no-binary", ":all:",
        "--dest", "/d"]
    reinstall = build.pip_reinstall_argv("/py", "0.3.36")
    assert "llama-cpp-python==0.3.36" in reinstall
    assert "--force-reinstall" in reinstall and "--no-cache-dir" in reinstall
    assert build.reinstall_cmake_args(BuildTarget("0.3.36", ("120",), cuda=True)) == (
        "-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=120")
    assert build.reinstall_cmake_args(BuildTarget("0.3.36")) == "-DGGML_CUDA=off"


def test_the_version_is_the_one_installed_in_the_engine_interpreter() -> None:
    in_process = metadata.version("llama-cpp-python")
    assert build.installed_version() == in_process
    assert build.installed_version(sys.executable) == in_process  # a real interpreter, asked in a subprocess
    assert build.installed_version("/nonexistent/python") is None


def test_the_estimate_grows_with_cuda_architectures_and_shrinks_with_jobs() -> None:
    cpu, cuda1 = BuildTarget("v"), BuildTarget("v", ("89",), cuda=True)
    cuda2 = BuildTarget("v", ("89", "120"), cuda=True)
    assert build.estimate_seconds(cpu, 2) < build.estimate_seconds(cuda1, 2) < build.estimate_seconds(cuda2, 2)
    assert build.estimate_seconds(cpu, 16) < build.estimate_seconds(cpu, 2)
    assert build.describe_duration(600) == "about 10 minutes"
    assert build.describe_duration(3 * 3600) == "about 3.0 hours"


def test_progress_is_one_rewritten_line_on_a_terminal_and_plain_lines_otherwise() -> None:
    assert build.ninja_progress("[12/206] Building CXX object x.o") == (12, 206)
    assert build.ninja_progress("-- Configuring done") is None
    tty, plain = io.StringIO(), io.StringIO()
    for reporter in (build.Reporter(tty, tty=True), build.Reporter(plain, tty=False)):
        for done in range(1, 101):
            reporter.progress("compiling", done, 100)
        reporter.say("done")
    assert tty.getvalue().count("\n") == 2 and "\r  compiling: 100% (100/100)\ndone\n" in tty.getvalue()
    assert plain.getvalue().splitlines()[0] == "  compiling: 1% (1/100)"
    assert len(plain.getvalue().splitlines()) == 12  # 1 %, every tenth, 100 % and "done"


def _fake_binary(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


def test_a_second_build_finds_the_binary_and_says_so_at_once(tmp_path: Path) -> None:
    target = BuildTarget("0.3.36")
    binary = _fake_binary(build.binary_path(tmp_path, target))
    out = io.StringIO()
    started = time.monotonic()
    # No cmake, no pip, no network: a python that does not exist would fail any of them.
    result = build.build_llama_server(target, tmp_path, 2, "/nonexistent/python", out)
    assert time.monotonic() - started < 1.0
    assert result == build.BuildResult(binary, already_built=True, seconds=0.0)
    assert out.getvalue() == (f"llama-server cpu for llama-cpp-python 0.3.36 is already built: {binary}\n")


FAKE_CMAKE = """\
#!/bin/sh
# cmake stand-in: configure records its arguments; --build prints ninja status lines and leaves a binary.
if [ "$1" = "--build" ]; then
    echo "[1/3] Building CXX object a.o"; echo "[2/3] Building CXX object b.o"; echo "[3/3] Linking llama-server"
    mkdir -p "$2/bin" && printf '#!/bin/sh\\necho built\\n' > "$2/bin/llama-server" && chmod +x "$2/bin/llama-server"
else
    echo "$@" > "$(dirname "$0")/configured"
    echo "-- Configuring done"
fi
"""


def test_a_build_configures_compiles_installs_and_reuses_the_unpacked_source(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tools = tmp_path / "tools"
    (tools / "cmake").parent.mkdir()
    (tools / "cmake").write_text(textwrap.dedent(FAKE_CMAKE))
    _fake_binary(tools / "ninja")
    (tools / "cmake").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}:/usr/bin:/bin")
    root = tmp_path / "cache"
    source = build.source_dir(root, "0.3.36")
    source.mkdir(parents=True)
    (source / "CMakeLists.txt").write_text("project(llama.cpp)\n")
    out = io.StringIO()
    result = build.build_llama_server(BuildTarget("0.3.36"), root, 3, "/nonexistent/python", out)
    assert not result.already_built and result.binary == root / "llama-server-0.3.36-cpu/bin/llama-server"
    assert result.binary.read_text() == "#!/bin/sh\necho built\n"
    configured = (tools / "configured").read_text()
    assert f"-S {source} -B {root}/build/llama-server-0.3.36-cpu -G Ninja" in configured
    assert f"-DCMAKE_MAKE_PROGRAM={tools}/ninja" in configured
    text = out.getvalue()
    assert "with 3 jobs: about" in text and "  compiling: 100% (3/3)" in text and "installed " in text
    assert (root / "llama-server-0.3.36-cpu/build.json").is_file()


def test_only_the_vendored_llama_cpp_is_unpacked(tmp_path: Path) -> None:
    tree = tmp_path / "tree" / "llama_cpp_python-9.9.9"
    for name in ("vendor/llama.cpp/CMakeLists.txt", "vendor/llama.cpp/tools/server/server.cpp", "llama_cpp/x.py"):
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text(name)
    sdist = tmp_path / "llama_cpp_python-9.9.9.tar.gz"
    with tarfile.open(sdist, "w:gz") as archive:
        archive.add(tree, arcname=tree.name)
    dest = tmp_path / "src" / "llama_cpp_python-9.9.9"
    build.unpack_vendored(sdist, dest)
    assert (dest / "vendor/llama.cpp/tools/server/server.cpp").read_text() == "vendor/llama.cpp/tools/server/server.cpp"
    assert not (dest / "llama_cpp").exists()
    assert [p.name for p in (tmp_path / "src").iterdir()] == ["llama_cpp_python-9.9.9"]  # no scratch left


def test_the_engine_prefers_the_configured_binary_then_path_then_a_cuda_build(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache-home"), "PATH": str(tmp_path / "empty")}
    root = build.cache_root(env)
    assert find_llama_server("", env, version="0.3.36") is None
    cpu = _fake_binary(build.binary_path(root, BuildTarget("0.3.36")))
    _fake_binary(build.binary_path(root, BuildTarget("0.3.35", ("89",), cuda=True)))  # another version: not ours
    assert find_llama_server("", env, version="0.3.36") == cpu
    cuda = _fake_binary(build.binary_path(root, BuildTarget("0.3.36", ("89", "120"), cuda=True)))
    assert find_llama_server("", env, version="0.3.36") == cuda
    on_path = _fake_binary(tmp_path / "bin" / "llama-server")
    assert find_llama_server("", {**env, "PATH": str(on_path.parent)}, version="0.3.36") == on_path
    configured = _fake_binary(tmp_path / "mine" / "llama-server")
    assert find_llama_server(str(configured), env, version="0.3.36") == configured
    assert find_llama_server(str(tmp_path / "missing"), env, version="0.3.36") is None


def test_the_engine_command_line() -> None:
    model = ModelEntry(name="coder", path=Path("/m.gguf"), ctx=16384, type_k="q8_0", type_v="q8_0", flash_attn=True,
                       slots=4, lora_path=Path("/a.gguf"),
                       options={"threads": 6, "kv_unified": True, "mmap": False, "-ub": 512})
    argv = llama_server_argv(model, 4321, "/bin/llama-server")
    pairs = dict(itertools.pairwise(argv))
    assert argv[0] == "/bin/llama-server" and "--jinja" in argv and "--no-webui" in argv
    assert (pairs["--host"], pairs["--port"], pairs["-m"], pairs["--alias"]) == ("127.0.0.1", "4321", "/m.gguf",
                                                                                  "coder")
    assert (pairs["-c"], pairs["-np"], pairs["-ngl"], pairs["-fa"]) == ("16384", "4", "all", "on")
    assert (pairs["-ctk"], pairs["-ctv"], pairs["--lora"], pairs["--fit"]) == ("q8_0", "q8_0", "/a.gguf", "off")
    assert (pairs["--threads"], pairs["-ub"]) == ("6", "512") and "--kv-unified" in argv and "--mmap" not in argv
    plain = llama_server_argv(ModelEntry(name="m", path=Path("/m.gguf"), n_gpu_layers=10), 1, "ls", flags=frozenset())
    assert "--no-webui" not in plain and "--fit" not in plain and "--lora" not in plain
    assert plain[plain.index("-np") + 1] == "1" and plain[plain.index("-ngl") + 1] == "10"


def test_the_cli_builds_nothing_when_the_build_is_there(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    version = metadata.version("llama-cpp-python")
    binary = _fake_binary(build.binary_path(tmp_path / "hybridd" / "engines", BuildTarget(version)))
    parser = argparse.ArgumentParser()
    engines_cli.add_arguments(parser)
    out, err = io.StringIO(), io.StringIO()
    assert engines_cli.run(parser.parse_args(["build", "--cpu", "-j", "2"]), out, err) == 0
    assert out.getvalue() == f"llama-server cpu for llama-cpp-python {version} is already built: {binary}\n"
    out = io.StringIO()
    assert engines_cli.run(parser.parse_args(["list"]), out, err) == 0
    assert out.getvalue() == f"{binary}\n" and err.getvalue() == ""


def _gpu_box(tmp_path: Path, compute_caps: str, **extra: str) -> dict[str, str]:
    """An environment with a fake nvidia-smi (answering compute_caps) on PATH and a fake nvcc as $CUDACXX."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\nprintf '{compute_caps}'\n")
    smi.chmod(0o755)
    nvcc = _fake_binary(tmp_path / "cuda" / "bin" / "nvcc")
    return {"PATH": f"{bin_dir}:/usr/bin:/bin", "XDG_CACHE_HOME": str(tmp_path / "cache"), "CUDACXX": str(nvcc),
            **extra}


def _engines_build(env: dict[str, str], *argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    engines_cli.add_arguments(parser)
    out, err = io.StringIO(), io.StringIO()
    code = engines_cli.run(parser.parse_args(["build", *argv]), out, err, env)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize(("argv", "variable", "archs", "source"), [
    ((), None, "89;120", "this machine's GPUs (nvidia-smi)"),
    (("--cuda",), "90a;121", "90a;121", "HYBRIDD_CUDA_ARCHS"),
    ((), "121", "121", "HYBRIDD_CUDA_ARCHS"),
    (("--cuda-archs", "100"), "121", "100", "--cuda-archs"),
])
def test_the_cli_builds_for_the_flag_else_the_variable_else_the_gpus(
        tmp_path: Path, argv: tuple[str, ...], variable: str | None, archs: str, source: str) -> None:
    extra = {"HYBRIDD_CUDA_ARCHS": variable} if variable is not None else {}
    env = _gpu_box(tmp_path, "12.0\n8.9\n", **extra)
    version = metadata.version("llama-cpp-python")
    target = BuildTarget(version, tuple(archs.split(";")), cuda=True)
    binary = _fake_binary(build.binary_path(build.cache_root(env), target))  # built already: the test compiles nothing
    code, out, err = _engines_build(env, *argv)
    assert (code, err) == (0, "")
    assert out == (f"CUDA architectures {archs}, from {source}\n"
                   f"llama-server {target.variant} for llama-cpp-python {version} is already built: {binary}\n")


def test_the_cli_refuses_bad_architectures_naming_where_they_came_from(tmp_path: Path) -> None:
    env = _gpu_box(tmp_path, "8.9\n", HYBRIDD_CUDA_ARCHS="8.9")
    code, out, err = _engines_build(env, "--cuda")
    assert (code, out) == (1, "")
    assert err == ("hybridd: HYBRIDD_CUDA_ARCHS: '8.9' is not a CUDA architecture (valid: compute capabilities "
                   "without the dot, separated by ';', e.g. 89;120 or 90a)\n")
    assert _engines_build(env, "--cuda-archs", "sm_89")[2].startswith("hybridd: --cuda-archs: 'sm_89' is not a CUDA")
    assert _engines_build(env, "--cpu", "--cuda-archs", "89") == \
        (2, "", "hybridd: --cuda-archs is for a CUDA build; drop --cpu or --cuda-archs\n")
    for not_one in ("00", "012", "35", "89f", "89a", "120-real"):  # what nvcc would refuse minutes later
        assert _engines_build(env, "--cuda-archs", not_one)[2].startswith(f"hybridd: --cuda-archs: {not_one!r}")
    assert build.parse_cuda_archs("90a;100f;120a;50", "x") == ("50", "90a", "100f", "120a")
    parser = argparse.ArgumentParser()
    engines_cli.add_arguments(parser)
    assert engines_cli.run(parser.parse_args(["list", "--cuda-archs", "89"]), io.StringIO(), io.StringIO(), env) == 2
    # a CPU build does not read the variable: setup.sh may leave it set on a box it builds for the CPU
    cpu = BuildTarget(metadata.version("llama-cpp-python"))
    _fake_binary(build.binary_path(build.cache_root(env), cpu))
    assert _engines_build(env, "--cpu")[:1] == (0,)
