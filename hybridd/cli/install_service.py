"""`hybridd install-service`: write hybridd's systemd unit with this install's paths, have systemd check it, and say
how to enable it. The unit's text comes from hybridd/systemd/unit.py."""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

from hybridd.systemd.unit import SYSTEM_USER, UnitSpec, render_unit

HELP = "write the systemd unit for this install (a user service, or --system) and print how to enable it"
DESCRIPTION = ("Writes hybridd.service (hybridd-peer.service with --role peer) with this install's hybridd and the "
               "config given, to ~/.config/systemd/user (or /etc/systemd/system with --system), checks it with "
               "systemd-analyze verify where that is installed, and prints the commands that enable it. With "
               "--dry-run it prints the unit and writes nothing.")
SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
VERIFY_TIMEOUT_S = 60.0
EXIT_OK, EXIT_ERROR = 0, 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `install-service` subcommand's arguments, on the parser main.py made for it."""
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--user", dest="system", action="store_false",
                       help="a user service, started at login (the default; the desktop)")
    scope.add_argument("--system", dest="system", action="store_true",
                       help=f"a system service run as the '{SYSTEM_USER}' user (a Spark) [env HYBRIDD_SYSTEM]")
    parser.set_defaults(system=_env_true("HYBRIDD_SYSTEM"))
    parser.add_argument("--role", choices=("desktop", "peer"), default=os.environ.get("HYBRIDD_ROLE", "desktop"),
                        help="the node's role: a peer's unit is hybridd-peer.service and serves with --role peer "
                        "(default desktop) [env HYBRIDD_ROLE]")
    parser.add_argument("--config", default=os.environ.get("HYBRIDD_CONFIG"), metavar="PATH",
                        help="the config the service reads (default: hybridd's default place for the service's "
                        "user) [env HYBRIDD_CONFIG]")
    parser.add_argument("--unit-dir", default=os.environ.get("HYBRIDD_UNIT_DIR"), metavar="DIR",
                        help="write the unit here instead of systemd's folder for user or system units "
                        "[env HYBRIDD_UNIT_DIR]")
    parser.add_argument("--dry-run", action="store_true", default=_env_true("HYBRIDD_DRY_RUN"),
                        help="print the unit and write nothing [env HYBRIDD_DRY_RUN]")


def run(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr,
        env: Mapping[str, str] | None = None) -> int:
    """Carry out `hybridd install-service`: 0 once the unit is written (or printed), 1 when it was not."""
    env = os.environ if env is None else env
    config = str(Path(args.config).expanduser().absolute()) if args.config else None
    spec = UnitSpec(system=args.system, role=args.role, program=this_hybridd(), config=config,
                    home=None if args.system else str(Path.home()))
    text = render_unit(spec)
    target = Path(args.unit_dir).expanduser() if args.unit_dir else unit_dir(args.system, env)
    path = target / spec.name
    if args.dry_run:
        out.write(text)
        print(f"(dry run: nothing written; it would go to {path}, then: {spec.enable_command()})", file=err)
        return EXIT_OK
    problems, note = verify(text, spec, env)
    if problems:
        print(f"hybridd install-service: systemd-analyze verify refused the unit; nothing written:\n{problems}",
              file=err)
        return EXIT_ERROR
    old = path.read_text() if path.is_file() else None
    try:
        _write(path, text)
    except OSError as exc:
        again = f"; run it as root: sudo {' '.join(spec.program)} install-service{spec.install_flags()}"
        print(f"hybridd install-service: cannot write {path}: {exc.strerror or exc}"
              f"{again if isinstance(exc, PermissionError) else ''}", file=err)
        return EXIT_ERROR
    done = "wrote" if old is None else "unchanged:" if old == text else "replaced"
    print(f"{done} {path}{f' ({note})' if note else ''}", file=out)
    for warning in _warnings(spec, config, env):
        print(f"note: {warning}", file=out)
    print(f"enable and start it with:\n  {spec.enable_command()}", file=out)
    return EXIT_OK


def this_hybridd() -> tuple[str, ...]:
    """What runs this install's hybridd: the `hybridd` script beside this interpreter (a venv's bin/), else
    `python -m hybridd` with this interpreter. Not resolved: a venv's python is a link out of the venv."""
    python = Path(os.path.abspath(sys.executable))
    script = python.parent / "hybridd"
    if script.is_file() and os.access(script, os.X_OK):
        return (str(script),)
    return (str(python), "-m", "hybridd")


def unit_dir(system: bool, env: Mapping[str, str]) -> Path:
    """Where systemd looks for units: /etc/systemd/system, or $XDG_CONFIG_HOME/systemd/user (~/.config/...)."""
    if system:
        return SYSTEM_UNIT_DIR
    config_home = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config_home) / "systemd" / "user"


def verify(text: str, spec: UnitSpec, env: Mapping[str, str]) -> tuple[str, str]:
    """Run `systemd-analyze verify` on the unit: (what it found wrong, "" if nothing; a note on how it went)."""
    analyze = shutil.which("systemd-analyze", path=env.get("PATH"))
    if analyze is None:
        return "", "not checked: systemd-analyze is not installed"
    with tempfile.TemporaryDirectory(prefix="hybridd-unit-") as folder:
        path = Path(folder) / spec.name  # verify reads the unit's name from its file's
        path.write_text(text)
        run_env = dict(env)
        if not spec.system and not env.get("XDG_RUNTIME_DIR"):
            # A user manager's paths need one; without it verify fails before it reads the unit (no login session).
            runtime = Path(folder) / "runtime"
            runtime.mkdir(mode=0o700)
            run_env["XDG_RUNTIME_DIR"] = str(runtime)
        argv = [analyze, *([] if spec.system else ["--user"]), "verify", str(path)]
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=VERIFY_TIMEOUT_S, env=run_env,
                                    check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return "", f"not checked: systemd-analyze verify did not run ({exc})"
    said = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    about_unit = [line for line in said if spec.name in line]
    if result.returncode != 0 and about_unit:
        return "\n".join(about_unit), ""
    if result.returncode != 0:
        return "", f"not checked: systemd-analyze verify could not run here ({'; '.join(said)[:200]})"
    if about_unit:  # e.g. an unknown key: systemd ignores it, and so would we, silently
        return "\n".join(about_unit), ""
    return "", "systemd-analyze verify: ok"


def _write(path: Path, text: str) -> None:
    """Write the unit whole or not at all (a rename over the old one), readable by all as units are."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as file:
        file.write(text)
    temporary = Path(file.name)
    try:
        temporary.chmod(0o644)
        temporary.replace(path)
    except OSError:
        temporary.unlink(missing_ok=True)
        raise


def _warnings(spec: UnitSpec, config: str | None, env: Mapping[str, str]) -> list[str]:
    """Where the service reads its config, and what would stop it from starting, or from starting when expected."""
    notes = []
    if config is None:
        default = "/etc/hybridd/config.toml" if spec.system else "$XDG_CONFIG_HOME/hybridd/config.toml (~/.config/...)"
        notes.append(f"the service reads {default}; without one it serves the demo model (--config names another)")
    elif not Path(config).is_file():
        notes.append(f"{config} does not exist yet; the service fails at start (exit 3) until it does")
    if spec.system:
        try:
            pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            notes.append(f"there is no '{SYSTEM_USER}' user yet: sudo useradd --system --create-home --home-dir "
                         f"/var/lib/{SYSTEM_USER} {SYSTEM_USER}")
        homes = [p for p in (spec.program[0], config) if p is not None and p.startswith(("/home/", "/root/"))]
        if homes:
            notes.append(f"the '{SYSTEM_USER}' user must be able to read {', '.join(homes)}; a system install "
                         "usually lives under /opt (python3 -m venv /opt/hybridd/.venv)")
    else:
        notes.append("a user service runs while you are logged in; to start it at boot: "
                     f"loginctl enable-linger {env.get('USER') or '$USER'}")
    return notes


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}
