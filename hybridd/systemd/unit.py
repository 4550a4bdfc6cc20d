"""hybridd's systemd unit, one template for every install: a user service on the desktop, a system service on a
Spark, either role. Settings that must stay in step (the watchdog, LimitNOFILE, the restart policy) are written once.

Pure: argv and paths in, unit text out; `hybridd install-service` (hybridd/cli/install_service.py) writes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

# systemd kills and restarts the service when the event loop sends no WATCHDOG=1 for this long (it pings at half).
WATCHDOG_SEC = 30
SYSTEM_USER = "hybridd"

TEMPLATE = """\
# {name}: {what}.
# Written by `hybridd install-service{flags}`; run it again rather than edit this file.
{setup}#   {enable}
[Unit]
Description={description}
After=network-online.target
Wants=network-online.target

[Service]
Type=notify
NotifyAccess=main
{account}ExecStart={exec_start}
# The event loop pings the watchdog every {half} s; a loop blocked for {watchdog} s is killed and restarted.
WatchdogSec={watchdog}s
# SIGTERM goes to the daemon only: it drains streams and stops its engines itself, then the rest is killed.
KillMode=mixed
TimeoutStopSec=60
Restart=on-failure
RestartSec=2
# Exit code 3 is a startup failure (bad config, port taken): restarting will not fix it.
RestartPreventExitStatus=3
Environment=PYTHONUNBUFFERED=1
# Descriptors, soft and hard. hybridd sizes its connection caps from this (half for the API, an eighth for
# untrusted LAN connections, the rest for engines, peers and files); systemd's default soft limit of 1024 would cap
# the API at 512.
LimitNOFILE=65536
{system}
[Install]
WantedBy={wanted_by}
"""

SYSTEM_SECTION = """\
Environment=XDG_CONFIG_HOME=/etc
Environment=XDG_STATE_HOME=/var/lib
StateDirectory=hybridd
StateDirectoryMode=0700
# The GPU device nodes must stay reachable; everything else is locked down.
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=read-only
PrivateTmp=yes
ReadWritePaths=/var/lib/hybridd
"""


@dataclass(frozen=True)
class UnitSpec:
    """What an install asks for: a user or system service, the node's role, the program and config it runs."""

    system: bool
    role: str  # desktop or peer
    program: tuple[str, ...]  # what runs hybridd, e.g. ("/opt/hybridd/.venv/bin/hybridd",)
    config: str | None = None  # an absolute path, or None for the default ($XDG_CONFIG_HOME/hybridd/config.toml)
    home: str | None = None  # in a user unit, paths under it are written %h/...

    @property
    def argv(self) -> tuple[str, ...]:
        """`hybridd serve`, with the role when it is a peer and the config when one was given."""
        argv = [*self.program, "serve"]
        if self.role == "peer":
            argv += ["--role", "peer"]
        if self.config is not None:
            argv += ["--config", self.config]
        return tuple(argv)

    @property
    def name(self) -> str:
        """The unit's file name: hybridd.service for a desktop, hybridd-peer.service for a peer."""
        return "hybridd-peer.service" if self.role == "peer" else "hybridd.service"

    def install_flags(self) -> str:
        """The `hybridd install-service` flags that write this unit again."""
        flags = " --system" if self.system else " --user"
        flags += " --role peer" if self.role == "peer" else ""
        return flags + (f" --config {self.config}" if self.config is not None else "")

    def enable_command(self) -> str:
        """The commands that load and start the installed unit."""
        unit = self.name.removesuffix(".service")
        if self.system:
            return f"sudo systemctl daemon-reload && sudo systemctl enable --now {unit}"
        return f"systemctl --user daemon-reload && systemctl --user enable --now {unit}"


def render_unit(spec: UnitSpec) -> str:
    """The unit file's text."""
    setup = (f"#   sudo useradd --system --create-home --home-dir /var/lib/{SYSTEM_USER} {SYSTEM_USER}  (once)\n"
             if spec.system else "")
    scope = "a system service" if spec.system else "a user service"
    what = f"{scope} ({'serves paired desktops on the LAN' if spec.role == 'peer' else 'the local endpoint'})"
    description = ("hybridd peer node: serves paired desktops on the LAN" if spec.role == "peer" else
                   "hybridd: local OpenAI-compatible endpoint that places requests on local GPUs or a DGX Spark")
    account = f"User={SYSTEM_USER}\nGroup={SYSTEM_USER}\n" if spec.system else ""
    return TEMPLATE.format(
        name=spec.name, what=what, flags=spec.install_flags(), setup=setup, enable=spec.enable_command(),
        description=description,
        account=account, exec_start=" ".join(_exec_arg(arg, spec) for arg in spec.argv),
        watchdog=WATCHDOG_SEC, half=f"{WATCHDOG_SEC / 2:g}",
        system=SYSTEM_SECTION if spec.system else "",
        wanted_by="multi-user.target" if spec.system else "default.target",
    )


def _exec_arg(arg: str, spec: UnitSpec) -> str:
    """One ExecStart= word: %h for the home of a user unit; %, $, quotes and backslashes escaped; quoted when it
    holds white space (systemd.service(5), "Command lines")."""
    prefix = ""
    if spec.home is not None and not spec.system and PurePosixPath(arg).is_relative_to(spec.home):
        prefix, arg = "%h/", str(PurePosixPath(arg).relative_to(spec.home))
    word = prefix + arg.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return f'"{word}"' if not arg or any(c.isspace() for c in arg) or "'" in arg else word


# The units the repository ships in systemd/, for reading and for packagers; install-service writes the real ones.
EXAMPLES = {
    "hybridd.service": UnitSpec(system=False, role="desktop", program=("/home/you/hybridd/.venv/bin/hybridd",),
                                home="/home/you"),
    "hybridd-peer.service": UnitSpec(system=True, role="peer", program=("/opt/hybridd/.venv/bin/hybridd",)),
}
