"""`hybridd engines build [llama-server|llama-cpp-python] [--cuda|--cpu] [--cuda-archs A] [--jobs N]` and
`hybridd engines list`."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Mapping
from typing import TextIO

from hybridd.engine import build

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
HELP = "build llama-server (or rebuild llama-cpp-python) for this machine's GPUs or CPU; list the builds"
DESCRIPTION = (
    "'hybridd engines build' compiles llama-server from the llama.cpp that the installed llama-cpp-python vendors "
    "(its sdist, fetched with pip) and installs it under $XDG_CACHE_HOME/hybridd/engines, where the llama-server "
    "engine finds it; a second run finds the build and returns. 'hybridd engines build llama-cpp-python' reinstalls "
    "llama-cpp-python compiled for CUDA (--cuda) or the CPU (--cpu). Without either flag, CUDA when nvidia-smi shows "
    "a GPU. A CUDA build is for --cuda-archs, else $HYBRIDD_CUDA_ARCHS (what scripts/setup.sh chose), else the GPUs' "
    "architectures. 'hybridd engines list' prints the builds for the installed version, the one the engine picks "
    "first.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `engines` subcommand's arguments, on the parser main.py made for it."""
    parser.add_argument("action", choices=("build", "list"), help="build an engine, or list the built ones")
    parser.add_argument("engine", nargs="?", choices=build.TARGETS, default="llama-server",
                        help="llama-server (the default) or llama-cpp-python")
    device = parser.add_mutually_exclusive_group()
    device.add_argument("--cuda", action="store_true", help="build for this machine's NVIDIA GPUs")
    device.add_argument("--cpu", action="store_true", help="build for the CPU (the default without an NVIDIA GPU)")
    parser.add_argument("--cuda-archs", default=None, metavar="ARCHS",
                        help="build for these CUDA architectures, e.g. '89;120' or 90a (implies --cuda; default: "
                        f"${build.ARCHS_VARIABLE}, else this machine's GPUs')")
    parser.add_argument("--jobs", "-j", type=int, default=None, metavar="N",
                        help="compilers at once (default: the CPU count)")
    parser.add_argument("--force", action="store_true", help="llama-server: rebuild even when already built")
    parser.add_argument("--python", default=sys.executable,
                        help="the interpreter whose llama-cpp-python version is built (default: this one)")


def run(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr,
        env: Mapping[str, str] | None = None) -> int:
    """Carry out `hybridd engines ...` in env (default: this process's environment); the exit code."""
    env = os.environ if env is None else env
    version = build.installed_version(None if args.python == sys.executable else args.python)
    if version is None:
        print(f"hybridd: llama-cpp-python is not installed for {args.python}: its version picks the llama.cpp to "
              "build", file=err)
        return EXIT_ERROR
    root = build.cache_root(env)
    if args.action == "list":
        if args.cuda_archs is not None or args.cuda or args.cpu:
            print("hybridd: 'engines list' lists every build; --cuda, --cpu and --cuda-archs go with 'build'",
                  file=err)
            return EXIT_USAGE
        for binary in build.built_binaries(root, version):
            print(binary, file=out)
        return EXIT_OK
    if args.cpu and args.cuda_archs is not None:
        print("hybridd: --cuda-archs is for a CUDA build; drop --cpu or --cuda-archs", file=err)
        return EXIT_USAGE
    compute_caps = build.query_compute_caps(shutil.which("nvidia-smi", path=env.get("PATH")) or "nvidia-smi")
    has_gpu = bool(compute_caps.strip())
    nvcc = build.find_nvcc(env)
    wants_cuda = args.cuda or args.cuda_archs is not None
    if wants_cuda and nvcc is None:
        print(f"hybridd: {'--cuda' if args.cuda else '--cuda-archs'} needs the CUDA toolkit (nvcc on PATH, "
              "$CUDACXX, or /usr/local/cuda/bin/nvcc)", file=err)
        return EXIT_ERROR
    cuda = wants_cuda or (not args.cpu and has_gpu and nvcc is not None)
    if has_gpu and not cuda and not args.cpu:
        print("nvidia-smi shows a GPU but there is no CUDA toolkit (nvcc): building for the CPU", file=out)
    try:  # a CPU build leaves $HYBRIDD_CUDA_ARCHS unread: setup.sh may have it set on a box it builds for the CPU
        asked = build.requested_archs(args.cuda_archs, env) if cuda else None
    except build.BuildFailed as exc:
        print(f"hybridd: {exc}", file=err)
        return EXIT_ERROR
    target = build.resolve_target(version, cuda, lambda: compute_caps, asked[0] if asked else None)
    if target.cuda and target.cuda_archs:
        where = asked[1] if asked else "this machine's GPUs (nvidia-smi)"
        print(f"CUDA architectures {';'.join(target.cuda_archs)}, from {where}", file=out)
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
