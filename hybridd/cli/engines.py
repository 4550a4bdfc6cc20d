"""`hybridd engines build [llama-server|llama-cpp-python] [--cuda|--cpu] [--jobs N]` and `hybridd engines list`."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TextIO

from hybridd.engine import build

EXIT_OK, EXIT_ERROR = 0, 1
HELP = "build llama-server (or rebuild llama-cpp-python) for this machine's GPUs or CPU; list the builds"
DESCRIPTION = (
    "'hybridd engines build' compiles llama-server from the llama.cpp that the installed llama-cpp-python vendors "
    "(its sdist, fetched with pip) and installs it under $XDG_CACHE_HOME/hybridd/engines, where the llama-server "
    "engine finds it; a second run finds the build and returns. 'hybridd engines build llama-cpp-python' reinstalls "
    "llama-cpp-python compiled for CUDA (--cuda) or the CPU (--cpu). Without either flag, CUDA when nvidia-smi shows "
    "a GPU. 'hybridd engines list' prints the builds for the installed version, the one the engine picks first.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `engines` subcommand's arguments, on the parser main.py made for it."""
    parser.add_argument("action", choices=("build", "list"), help="build an engine, or list the built ones")
    parser.add_argument("engine", nargs="?", choices=build.TARGETS, default="llama-server",
                        help="llama-server (the default) or llama-cpp-python")
    device = parser.add_mutually_exclusive_group()
    device.add_argument("--cuda", action="store_true", help="build for this machine's NVIDIA GPUs")
    device.add_argument("--cpu", action="store_true", help="build for the CPU (the default without an NVIDIA GPU)")
    parser.add_argument("--jobs", "-j", type=int, default=None, metavar="N",
                        help="compilers at once (default: the CPU count)")
    parser.add_argument("--force", action="store_true", help="llama-server: rebuild even when already built")
    parser.add_argument("--python", default=sys.executable,
                        help="the interpreter whose llama-cpp-python version is built (default: this one)")


def run(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Carry out `hybridd engines ...`; the exit code."""
    version = build.installed_version(None if args.python == sys.executable else args.python)
    if version is None:
        print(f"hybridd: llama-cpp-python is not installed for {args.python}: its version picks the llama.cpp to "
              "build", file=err)
        return EXIT_ERROR
    root = build.cache_root(os.environ)
    if args.action == "list":
        for binary in build.built_binaries(root, version):
            print(binary, file=out)
        return EXIT_OK
    has_gpu = bool(build.query_compute_caps().strip())
    nvcc = build.find_nvcc(os.environ)
    if args.cuda and nvcc is None:
        print("hybridd: --cuda needs the CUDA toolkit (nvcc on PATH, $CUDACXX, or /usr/local/cuda/bin/nvcc)", file=err)
        return EXIT_ERROR
    cuda = args.cuda or (not args.cpu and has_gpu and nvcc is not None)
    if has_gpu and not cuda and not args.cpu:
        print("nvidia-smi shows a GPU but there is no CUDA toolkit (nvcc): building for the CPU", file=out)
    target = build.resolve_target(version, cuda)
    jobs = args.jobs if args.jobs and args.jobs > 0 else build.default_jobs(os.cpu_count())
    try:
        if args.engine == "llama-server":
            build.build_llama_server(target, root, jobs, args.python, out, force=args.force)
        else:
            build.rebuild_llama_cpp_python(target, jobs, args.python, out)
    except build.BuildFailed as exc:
        print(f"hybridd: {exc}", file=err)
        return EXIT_ERROR
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """`python -m hybridd.cli.engines ...`: the same as `hybridd engines ...` (scripts/build_engines.sh uses it)."""
    parser = argparse.ArgumentParser(prog="hybridd engines", description=DESCRIPTION)
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
