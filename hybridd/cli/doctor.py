"""`hybridd doctor [--json]`: what a new install needs, each check ok / warn / fail with what to do.

Exit 1 when a check fails (something blocks serving), else 0. Every check runs in this process or a child of it; the
running daemon, if any, is asked over its loopback API. The firewall readers (`iptables_verdict`, `nft_verdict`,
`ufw_verdict`) are pure functions of the tools' text, so tests feed them canned rule sets.
"""

from __future__ import annotations

import argparse
import email.utils
import errno
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from hybridd.config import (
    DEFAULT_LAN_PORT,
    MANAGED_KINDS,
    Config,
    config_path,
    lan_listen,
    load_config,
    state_dir,
)
from hybridd.engine import build
from hybridd.errors import ConfigError
from hybridd.probe import engine_builds

if TYPE_CHECKING:
    from hybridd.probe.gpus import GpuInfo, MachineSnapshot

EXIT_OK, EXIT_FAIL = 0, 1
OK, WARN, FAIL = "ok", "warn", "fail"
HELP = "check what this install needs (driver, GPUs, engine builds, config, port, state, firewall, peers)"
DESCRIPTION = ("Runs every check a new install needs and says, for each, ok, warn or fail and what to do. Exit "
               "status 1 when something blocks serving (a fail), else 0.")
MDNS_PORT = 5353
TOOL_TIMEOUT_S = 10.0
HTTP_TIMEOUT_S = 3.0
LOW_FREE_FRACTION = 0.25  # a GPU with less free than this is mostly taken by other programs
SKEW_WARN_S = 5.0  # Date headers have 1 s resolution; beyond a few seconds the clock is really off
ACCEPT, DROP, UNKNOWN = "accept", "drop", "unknown"
GIB = 1024**3


@dataclass(frozen=True)
class Check:
    """One finding: what was checked, ok/warn/fail, what was found, and what to do about it ('' when nothing)."""

    name: str
    status: str
    detail: str
    fix: str = ""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `doctor` subcommand's arguments, on the parser main.py made for it."""
    parser.add_argument("--json", action="store_true", default=_env_true("HYBRIDD_JSON"),
                        help="print the checks as one JSON object [env HYBRIDD_JSON]")
    parser.add_argument("--config", default=os.environ.get("HYBRIDD_CONFIG"), metavar="PATH",
                        help=f"config file (default {config_path()}) [env HYBRIDD_CONFIG]")


def run(args: argparse.Namespace, out: TextIO = sys.stdout, env: Mapping[str, str] | None = None,
        nvml: Any = None, use_real_nvml: bool = True) -> int:
    """Carry out `hybridd doctor`; 1 when a check failed, else 0. nvml: a fake pynvml for tests."""
    env = dict(os.environ) if env is None else dict(env)
    if nvml is None and use_real_nvml:
        nvml = _load_pynvml()
    checks = run_checks(Path(args.config) if args.config else None, env, nvml)
    failed = any(c.status == FAIL for c in checks)
    if args.json:
        counts = {s: sum(1 for c in checks if c.status == s) for s in (OK, WARN, FAIL)}
        print(json.dumps({"checks": [asdict(c) for c in checks], **counts,
                          "exit_code": EXIT_FAIL if failed else EXIT_OK}, indent=2), file=out)
    else:
        print(render(checks), file=out)
    return EXIT_FAIL if failed else EXIT_OK


def run_checks(config_file: Path | None, env: Mapping[str, str], nvml: Any,
               clock: Callable[[], float] = time.time) -> list[Check]:
    """Every check, in the order a person fixes them: machine, engines, config, port, state, firewall, peers."""
    config_checks, config = check_config(config_file, env)
    gpu_checks, snapshot = check_gpus(nvml, env)
    checks = [*gpu_checks]
    checks += check_engines(config, len(snapshot.gpus), env)
    checks += config_checks
    port_checks, daemon_url = check_ports(config)
    checks += port_checks
    checks.append(check_state_dir(config, env))
    checks += check_firewall(config, env)
    checks += check_peers(daemon_url, clock)
    return checks


def render(checks: Sequence[Check]) -> str:
    """The text: one line per check, the fix under it, a count at the end."""
    width = max((len(c.name) for c in checks), default=0)
    lines = []
    for c in checks:
        lines.append(f"{c.status:<4}  {c.name:<{width}}  {c.detail}")
        if c.fix:
            lines.append(f"{'':<4}  {'':<{width}}  -> {c.fix}")
    counts = ", ".join(f"{sum(1 for c in checks if c.status == s)} {s}" for s in (OK, WARN, FAIL))
    verdict = "something blocks serving" if any(c.status == FAIL for c in checks) else "nothing blocks serving"
    return "\n".join([*lines, "", f"{counts}: {verdict}"])


# The machine: driver, NVML, each GPU.

def check_gpus(nvml: Any, env: Mapping[str, str]) -> tuple[list[Check], MachineSnapshot]:
    """nvidia-smi (the driver), NVML (what placement sees), and each GPU's free memory and display."""
    # Imported here, as each subcommand does: `hybridd status` need not load psutil to start.
    from hybridd.probe.gpus import GpuProbe
    from hybridd.probe.host import HostProbe

    checks = []
    smi = shutil.which("nvidia-smi", path=env.get("PATH"))
    smi_gpus = 0
    if smi is None:
        driver = Check("nvidia driver", WARN, "no nvidia-smi on PATH: no NVIDIA driver, this node serves on the CPU",
                       "on a machine with an NVIDIA GPU install the driver (e.g. sudo apt install nvidia-driver-570) "
                       "and reboot")
    else:
        done = _run_tool([smi, "--query-gpu=driver_version,name", "--format=csv,noheader"], env)
        rows = [r for r in (done[1].splitlines() if done[0] == 0 else []) if r.strip()]
        smi_gpus = len(rows)
        if rows:
            version = rows[0].split(",")[0].strip()
            driver = Check("nvidia driver", OK, f"driver {version}, nvidia-smi shows {len(rows)} "
                           f"GPU{'s' if len(rows) != 1 else ''}")
        else:
            driver = Check("nvidia driver", WARN, f"nvidia-smi failed: {_last_line(done[1] + done[2])}",
                           "reinstall the NVIDIA driver matching this kernel, or reboot after a driver update")
    checks.append(driver)
    probe = GpuProbe(nvml, HostProbe())
    try:
        snapshot = probe.snapshot()
    finally:
        probe.close()
    if snapshot.gpus:
        checks.append(Check("nvml", OK, f"NVML sees {len(snapshot.gpus)} GPU{'s' if len(snapshot.gpus) != 1 else ''}"))
    else:
        why = "; ".join(snapshot.notes) or "NVML shows no GPU"
        fix = ""
        if "nvidia-ml-py" in why:
            fix = f"install it where hybridd runs: {sys.executable} -m pip install nvidia-ml-py"
        elif smi_gpus:
            fix = "NVML and the driver disagree: reboot after a driver update"
        checks.append(Check("nvml", WARN if smi_gpus or fix else OK,
                            f"{why}: placement plans this node as CPU-only", fix))
    for gpu in snapshot.gpus:
        checks.append(_gpu_check(gpu))
    return checks, snapshot


def _gpu_check(gpu: GpuInfo) -> Check:
    name = f"gpu {gpu.index}"
    detail = f"{gpu.name}: {gpu.free_bytes / GIB:.1f} of {gpu.total_bytes / GIB:.1f} GiB free"
    if gpu.unified:
        detail += " (unified memory: the host's)"
    if gpu.display_active:
        detail += ", drives a display (1 GiB kept back for it)"
    if gpu.total_bytes and gpu.free_bytes < LOW_FREE_FRACTION * gpu.total_bytes and not gpu.unified:
        pids = ", ".join(str(p.pid) for p in gpu.processes) or "unknown"
        return Check(name, WARN, detail + f"; other programs hold the rest (pids {pids})",
                     "close the programs holding GPU memory (nvidia-smi lists them) before serving large models")
    return Check(name, OK, detail)


# The engines: what each build offloads to.

def check_engines(config: Config, gpu_count: int, env: Mapping[str, str]) -> list[Check]:
    """llama-cpp-python (in [engine] python) and llama-server (found or not): installed, and what they run on."""
    from hybridd.engine.choice import with_chosen_engine  # loads aiohttp: only when doctor runs
    from hybridd.engine.llamaserver import find_llama_server

    # The models that name no engine run on the one `hybridd serve` would choose.
    override = env.get("HYBRIDD_ENGINE") if env.get("HYBRIDD_ENGINE") in MANAGED_KINDS else None
    config = with_chosen_engine(config, override, dict(env))[0]
    in_use = {config.engine.kind, *(m.engine for m in config.models if m.path is not None)} & set(MANAGED_KINDS)
    python = config.engine.python or sys.executable
    nvcc = build.find_nvcc(env)
    python_build = engine_builds.probe_llama_cpp_python(python)
    checks = [_engine_check(python_build, in_use, gpu_count, nvcc)]
    if config.engine.llama_server and find_llama_server(config.engine.llama_server, dict(env)) is None:
        checks.append(Check("llama-server", FAIL if "llama-server" in in_use else WARN,
                            f"engine.llama_server: {config.engine.llama_server} is not an executable file",
                            "point engine.llama_server at a llama-server binary, or remove it to use the built one"))
    else:
        # The built llama-server must match the llama-cpp-python version (both vendor the same llama.cpp).
        binary = find_llama_server(config.engine.llama_server, dict(env), version=python_build.version)
        checks.append(_engine_check(engine_builds.probe_llama_server(binary), in_use, gpu_count, nvcc))
    if gpu_count:
        checks.append(Check("cuda toolkit", OK, f"nvcc at {nvcc}") if nvcc else
                      Check("cuda toolkit", OK, "no nvcc: only needed to build a CUDA engine"))
    return checks


def _engine_check(found: engine_builds.EngineBuild, in_use: set[str], gpu_count: int, nvcc: str | None) -> Check:
    name = found.engine
    used = found.engine in in_use
    rebuild = ("hybridd engines build --cuda" if found.engine == engine_builds.LLAMA_SERVER
               else "hybridd engines build llama-cpp-python --cuda")
    if not found.installed:
        fix = ("hybridd engines build" if found.engine == engine_builds.LLAMA_SERVER
               else f"{found.location} -m pip install llama-cpp-python")
        if not used:
            return Check(name, OK, f"not installed ({found.problem}); only needed for engine = \"{found.engine}\"",
                         fix)
        return Check(name, FAIL, f"not installed ({found.problem}), and the config's models use it", fix)
    if found.gpu_offload is None:
        return Check(name, WARN if used else OK, found.describe(), "")
    warning = engine_builds.unused_gpu_warning(found, gpu_count)
    if warning:
        fix = rebuild if nvcc else f"install the CUDA toolkit (nvcc), then: {rebuild}"
        return Check(name, WARN, f"{warning}; {found.describe()}", fix)
    return Check(name, OK, found.describe() + ("" if used else " (no model uses it)"))


# The config, the ports, the state directory.

def check_config(path: Path | None, env: Mapping[str, str]) -> tuple[list[Check], Config]:
    """The config loads (else the loader's message); model files named in it exist."""
    path = path or config_path(env)
    if not path.exists():
        return [Check("config", OK, f"no config at {path}: 'hybridd serve' serves the demo model")], Config()
    try:
        config = load_config(path)
    except ConfigError as exc:
        return [Check("config", FAIL, str(exc), "fix the key the message names, then run 'hybridd doctor' again")], \
            Config()
    checks = [Check("config", OK, f"{path}: {len(config.models)} model{'s' if len(config.models) != 1 else ''}, "
                    f"{len(config.peers)} configured peer{'s' if len(config.peers) != 1 else ''}")]
    for model in config.models:
        if model.path is not None and not model.path.exists():
            checks.append(Check(f"model {model.name}", WARN, f"file {model.path} does not exist; requests for it fail",
                                "fix the model's path in the config, or download the file"))
    return checks, config


def check_ports(config: Config) -> tuple[list[Check], str | None]:
    """The listen port is free or held by a running hybridd (its URL returned); the peer port likewise."""
    host, port = config.server.host, config.server.port
    url_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{'[' + url_host + ']' if ':' in url_host else url_host}:{port}"
    checks = []
    problem = _bind_problem(host, port)
    daemon_url: str | None = None
    if problem is None:
        checks.append(Check("listen port", OK, f"{config.server.listen} is free"))
    else:
        status = _get_json(url + "/hybridd/v1/status") if problem == "in use" else None
        if isinstance(status, dict) and "version" in status:
            daemon_url = url
            checks.append(Check("listen port", OK, f"{config.server.listen} is the running hybridd "
                                f"{status['version']} (pid {status.get('pid')})"))
        else:
            checks.append(Check("listen port", FAIL, f"{config.server.listen}: {problem}"
                                + (" by another program" if problem == "in use" else ""),
                                f"stop it (ss -ltnp 'sport = :{port}' shows which) or set server.listen in the config"))
    lan = lan_listen(config)
    if lan is not None:
        lan_problem = _bind_problem(*lan)
        if lan_problem is None:
            checks.append(Check("peer port", OK, f"{lan[0]}:{lan[1]} is free"))
        elif lan_problem == "in use" and daemon_url is not None:
            checks.append(Check("peer port", OK, f"{lan[0]}:{lan[1]} is the running hybridd's"))
        else:
            checks.append(Check("peer port", FAIL, f"{lan[0]}:{lan[1]}: {lan_problem}",
                                f"stop what holds it (ss -ltnp 'sport = :{lan[1]}') or set server.lan_listen"))
    return checks, daemon_url


def _bind_problem(host: str, port: int) -> str | None:
    """None when a listener could bind host:port now (as the daemon binds: SO_REUSEADDR), else why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "in use"
            return f"cannot listen there ({exc.strerror or exc})"
    return None


def check_state_dir(config: Config, env: Mapping[str, str]) -> Check:
    """The state directory (keys, paired peers, jobs): 0700 and owned by this user, or not made yet."""
    folder = config.state_dir or state_dir(env)
    try:
        info = folder.stat()
    except FileNotFoundError:
        return Check("state dir", OK, f"{folder} is not made yet: 'hybridd serve' makes it (0700)")
    except OSError as exc:
        return Check("state dir", FAIL, f"{folder}: {exc.strerror or exc}", "fix its permissions or set state_dir")
    mode = info.st_mode & 0o777
    if not folder.is_dir():
        return Check("state dir", FAIL, f"{folder} is not a folder", "move it away or set state_dir")
    if info.st_uid != os.getuid():
        return Check("state dir", FAIL, f"{folder} belongs to uid {info.st_uid}, not to this user ({os.getuid()})",
                     f"sudo chown -R {os.getuid()} {folder}")
    if not os.access(folder, os.W_OK | os.X_OK):
        return Check("state dir", FAIL, f"{folder} is mode {mode:04o}: this user cannot write it",
                     f"chmod 700 {folder}")
    if mode & 0o077:
        return Check("state dir", WARN, f"{folder} is mode {mode:04o}: other users can read this node's private "
                     "key and its paired peers", f"chmod 700 {folder}")
    return Check("state dir", OK, f"{folder} (0700, yours)")


# The firewall: would the local rules drop mDNS or the peer port?

def check_firewall(config: Config, env: Mapping[str, str]) -> list[Check]:
    """What nft, iptables and ufw (those present and readable) do with UDP 5353 and the peer's TCP port."""
    lan = lan_listen(config)
    peer_port = lan[1] if lan else DEFAULT_LAN_PORT
    readers: list[tuple[str, str, Callable[[str, str, int], str]]] = []
    unreadable: list[str] = []
    for tool, argv, judge in (("nft", ["list", "ruleset"], nft_verdict), ("iptables", ["-S"], iptables_verdict),
                              ("ufw", ["status", "verbose"], ufw_verdict)):
        path = shutil.which(tool, path=env.get("PATH"))
        if path is None:
            continue
        code, stdout, stderr = _run_tool([path, *argv], env)
        if code != 0:
            unreadable.append(f"{tool}: {_last_line(stderr or stdout)}")
            continue
        readers.append((tool, stdout, judge))
    checks = []
    for label, proto, port in (("mdns", "udp", MDNS_PORT), ("peer port firewall", "tcp", peer_port)):
        what = f"{proto.upper()} {port}"
        if not readers and not unreadable:
            checks.append(Check(label, OK, f"{what}: no nft, iptables or ufw on PATH: no local firewall to ask"))
            continue
        verdicts = {tool: judge(text, proto, port) for tool, text, judge in readers}
        dropped = [tool for tool, v in verdicts.items() if v == DROP]
        unknown = [tool for tool, v in verdicts.items() if v == UNKNOWN]
        peer_node = config.node.role == "peer"
        fix = (f"allow it: sudo ufw allow {port}/{proto}, or "
               f"sudo nft add rule inet filter input {proto} dport {port} accept")
        if dropped:
            status = FAIL if proto == "tcp" and peer_node else WARN
            use = "discovery of peers on the LAN" if port == MDNS_PORT else "paired desktops reaching this node"
            checks.append(Check(label, status, f"{what} is dropped by {', '.join(dropped)}: it blocks {use}", fix))
        elif unknown or unreadable or not verdicts:
            why = [f"{t}: rules too conditional to tell" for t in unknown] + unreadable
            checks.append(Check(label, WARN, f"{what}: unknown ({'; '.join(why)})",
                                "run 'sudo hybridd doctor' to read the rules, or check them by hand"))
        else:
            checks.append(Check(label, OK, f"{what} is allowed ({', '.join(verdicts)})"))
    return checks


_IPT_TERMINAL = {"ACCEPT": ACCEPT, "DROP": DROP, "REJECT": DROP}
_IPT_PORT_OPTIONS = ("--dport", "--dports", "--destination-port", "--destination-ports")


def iptables_verdict(rules: str, proto: str, port: int) -> str:
    """What `iptables -S` rules do with a new inbound packet to proto/port: accept, drop, or unknown."""
    policies: dict[str, str] = {}
    chains: dict[str, list[list[str]]] = {}
    for line in rules.splitlines():
        tokens = _split(line)
        if len(tokens) >= 3 and tokens[0] == "-P":
            policies[tokens[1]] = tokens[2]
        elif len(tokens) >= 2 and tokens[0] == "-N":
            chains.setdefault(tokens[1], [])
        elif len(tokens) >= 2 and tokens[0] == "-A":
            chains.setdefault(tokens[1], []).append(tokens[2:])
    unsure = [False]

    def walk(chain: str, depth: int) -> str | None:
        for rule in chains.get(chain, []):
            applies = _ipt_applies(rule, proto, port)
            target = _after(rule, "-j") or _after(rule, "-g") or ""
            if applies is False:
                continue
            if applies is None:  # a condition we cannot judge: an ACCEPT under it may let the packet in
                if target not in ("DROP", "REJECT"):
                    unsure[0] = True
                continue
            if target in _IPT_TERMINAL:
                return _IPT_TERMINAL[target]
            if target == "RETURN":
                return None
            if target in chains and depth < 16:
                found = walk(target, depth + 1)
                if found is not None:
                    return found
        return None

    found = walk("INPUT", 0)
    if found is None:
        found = ACCEPT if policies.get("INPUT", "ACCEPT") == "ACCEPT" else DROP
    return UNKNOWN if unsure[0] and found == DROP else found


def _ipt_applies(rule: list[str], proto: str, port: int) -> bool | None:
    """True/False when the rule surely does/does not match a new LAN packet to proto/port; None when unsure."""
    i, sure = 0, True
    while i < len(rule):
        option = rule[i]
        value = rule[i + 1] if i + 1 < len(rule) else ""
        if option in ("-j", "-g"):
            i += 2
            continue
        if option == "-p":
            if value not in (proto, "all"):
                return False
        elif option == "-m":
            pass  # tcp, udp, multiport, comment, conntrack: their options follow
        elif option in _IPT_PORT_OPTIONS:
            if not _port_in(value, port, ":"):
                return False
        elif option == "--comment":
            pass
        elif option in ("--ctstate", "--state"):
            if "NEW" not in value.split(","):
                return False  # established/related/invalid: not a new connection
        elif option == "-i" and value == "lo":
            return False
        else:
            sure = False
            i += 1 if option.startswith("!") else 0
        i += 2
    return True if sure else None


def nft_verdict(ruleset: str, proto: str, port: int) -> str:
    """What `nft list ruleset` does with a new inbound packet to proto/port: accept, drop, or unknown."""
    chains: dict[tuple[str, str], list[str]] = {}
    bases: list[tuple[tuple[str, str], str]] = []  # (chain, policy) of every filter chain on the input hook
    table, chain, depth = "", "", 0
    for raw in ruleset.splitlines():
        line = raw.strip()
        if line.endswith("{"):
            depth += 1
            words = line.split()
            if words[0] == "table":
                table = " ".join(words[1:-1])
            elif words[0] == "chain":
                chain = words[1]
                chains[(table, chain)] = []
            else:
                chain = ""  # a set or map: its elements are not rules
            continue
        if line == "}":
            depth -= 1
            chain = "" if depth <= 1 else chain
            continue
        if not chain or not line:
            continue
        if line.startswith("type ") and " hook input " in f"{line} ":
            stated = re.search(r"policy (\w+)", line)
            bases.append(((table, chain), stated.group(1) if stated else "accept"))
        elif not line.startswith(("type ", "policy ")):
            chains[(table, chain)].append(line)
    if not bases:
        return ACCEPT
    unsure = [False]

    def walk(key: tuple[str, str], level: int) -> str | None:
        for rule in chains.get(key, []):
            applies, verdict, target = _nft_rule(rule, proto, port)
            if applies is False or verdict is None:
                continue
            if applies is None:
                if verdict != DROP:
                    unsure[0] = True
                continue
            if verdict in (ACCEPT, DROP):
                return verdict
            if verdict == "return":
                return None
            if verdict in ("jump", "goto") and level < 16:
                found = walk((key[0], target), level + 1)
                if found is not None or verdict == "goto":
                    return found
        return None

    verdicts = []
    for key, policy in bases:
        found = walk(key, 0)
        verdicts.append(found if found is not None else (DROP if policy in ("drop", "reject") else ACCEPT))
    if DROP in verdicts:
        return UNKNOWN if unsure[0] else DROP
    return ACCEPT


def _nft_rule(rule: str, proto: str, port: int) -> tuple[bool | None, str | None, str]:
    """(applies, verdict, jump target) of one nft rule; applies None when a condition cannot be judged."""
    rule = re.sub(r'comment "[^"]*"', "", rule)
    tokens = re.findall(r"\{[^}]*\}|\"[^\"]*\"|\S+", rule)
    applies: bool | None = True
    verdict: str | None = None
    target = ""
    i = 0
    while i < len(tokens):
        word = tokens[i]
        rest = tokens[i + 1:]
        if word in ("tcp", "udp", "th") and rest[:1] == ["dport"] and len(rest) >= 2:
            if (word != "th" and word != proto) or not _port_in(rest[1], port, "-"):
                return False, None, ""
            i += 3
            continue
        if word in ("meta", "ip", "ip6") and len(rest) >= 2 and rest[0] in ("l4proto", "protocol", "nexthdr"):
            if proto not in rest[1].strip("{}").replace(",", " ").split():
                return False, None, ""
            i += 3
            continue
        if word == "ct" and rest[:1] == ["state"] and len(rest) >= 2:
            if "new" not in rest[1].strip("{}").replace(",", " ").split():
                return False, None, ""
            i += 3
            continue
        if word in ("iif", "iifname") and rest:
            if rest[0].strip('"') == "lo":
                return False, None, ""
            applies = None
            i += 2
            continue
        if word in ("accept", "drop", "reject", "return"):
            verdict = {"accept": ACCEPT, "drop": DROP, "reject": DROP}.get(word, word)
            break
        if word in ("jump", "goto") and rest:
            verdict, target = word, rest[0]
            break
        if word in ("counter", "log"):
            i += 1
            while i < len(tokens) and tokens[i] in ("packets", "bytes", "prefix", "level", "flags"):
                i += 2
            continue
        applies = None
        i += 1
    return applies, verdict, target


def ufw_verdict(status: str, proto: str, port: int) -> str:
    """What `ufw status verbose` does with a new inbound packet to proto/port: accept, drop, or unknown."""
    if "Status: active" not in status:
        return ACCEPT  # inactive: ufw adds no rule
    default = re.search(r"Default:\s*(\w+) \(incoming\)", status)
    unsure = False
    for line in status.splitlines():
        match = re.match(r"^(\S+)(?: \(v6\))?\s+(ALLOW|DENY|REJECT|LIMIT)(?: IN)?\s+(.+?)\s*$", line)
        if match is None:
            continue
        to, action, source = match.groups()
        ports, _, rule_proto = to.partition("/")
        if rule_proto and rule_proto != proto:
            continue
        if not re.fullmatch(r"[\d:,]+", ports) or not _port_in(ports, port, ":"):
            if not re.fullmatch(r"[\d:,]+", ports):
                unsure = unsure or action in ("ALLOW", "LIMIT")  # an app profile or an address: cannot tell
            continue
        if not source.startswith("Anywhere"):
            unsure = unsure or action in ("ALLOW", "LIMIT")
            continue
        return ACCEPT if action in ("ALLOW", "LIMIT") else DROP
    found = ACCEPT if default and default.group(1) == "allow" else DROP
    return UNKNOWN if unsure and found == DROP else found


def _port_in(value: str, port: int, range_sep: str) -> bool:
    """Whether port is in '5353', '22,5353', '{ 22, 5353 }' or '11000:12000' (nft: '11000-12000')."""
    for part in value.strip("{}").replace(" ", "").split(","):
        low, sep, high = part.partition(range_sep)
        if low.isdigit() and (high.isdigit() if sep else True) and int(low) <= port <= int(high if sep else low):
            return True
    return False


def _split(line: str) -> list[str]:
    return re.findall(r'"[^"]*"|\S+', line)


def _after(tokens: list[str], option: str) -> str | None:
    return tokens[tokens.index(option) + 1] if option in tokens[:-1] else None


# The peers: the running daemon's links, and each peer's clock.

def check_peers(daemon_url: str | None, clock: Callable[[], float] = time.time) -> list[Check]:
    """Each paired peer's link (from the running daemon) and its clock skew from its HTTP Date header."""
    if daemon_url is None:
        return [Check("peers", OK, "not checked: no hybridd is running here ('hybridd serve', then run this again)")]
    peers = _get_json(daemon_url + "/hybridd/v1/peers")
    if not isinstance(peers, dict):
        return [Check("peers", OK, "peering is off on this node")]
    paired = peers.get("paired", [])
    if not paired:
        return [Check("peers", OK, f"no paired peers; {len(peers.get('discovered', []))} found on the LAN")]
    checks = []
    for peer in paired:
        skew = peer_clock_skew(str(peer.get("address")), int(peer.get("port") or DEFAULT_LAN_PORT), clock)
        skew_text = "clock skew unknown" if skew is None else f"clock skew {skew:+.0f} s"
        where = f"{peer.get('address')}:{peer.get('port')}"
        name = f"peer {peer.get('name')}"
        if peer.get("link") != "up":
            checks.append(Check(name, WARN, f"{where}: link down ({peer.get('down_reason') or 'no reason given'}), "
                                f"{skew_text}", "check that 'hybridd serve --role peer' runs there and that TCP "
                                f"{peer.get('port')} reaches it ('hybridd doctor' on the peer)"))
        elif skew is not None and abs(skew) > SKEW_WARN_S:
            checks.append(Check(name, WARN, f"{where}: link up, {skew_text}",
                                "turn on NTP on both machines: sudo timedatectl set-ntp true"))
        else:
            rtt = peer.get("rtt_ms")
            rtt_text = f", rtt {rtt:.1f} ms" if isinstance(rtt, int | float) else ""
            checks.append(Check(name, OK, f"{where}: link up{rtt_text}, {skew_text}"))
    return checks


def peer_clock_skew(address: str, port: int, clock: Callable[[], float] = time.time,
                    scheme: str = "https") -> float | None:
    """The peer's clock minus ours, in seconds, from the Date header of any answer; None when it cannot be reached.

    The peer's listener asks for a client certificate but does not demand one at the handshake: an anonymous
    request gets a 403, which carries a Date like any other answer.
    """
    host = f"[{address}]" if ":" in address else address
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only the clock is read: nothing is trusted from this answer
    request = urllib.request.Request(f"{scheme}://{host}:{port}/hybridd/v1/hello")
    sent = clock()
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S, context=context) as response:
            date = response.headers.get("Date")
    except urllib.error.HTTPError as exc:
        date = exc.headers.get("Date")
    except (urllib.error.URLError, OSError, ValueError):
        return None
    received = clock()
    if not date:
        return None
    try:
        their = email.utils.parsedate_to_datetime(date).timestamp()
    except (TypeError, ValueError):
        return None
    return their - (sent + received) / 2


def _get_json(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
            return json.load(response)
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _run_tool(argv: list[str], env: Mapping[str, str]) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of a tool; 127 and the reason when it cannot run or hangs."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False,
                              env=dict(env), stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 127, "", str(exc)
    return done.returncode, done.stdout, done.stderr


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:200] if lines else "no output"


def _load_pynvml() -> Any:
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def main(argv: list[str] | None = None) -> int:
    """`python -m hybridd.cli.doctor ...`: the same as `hybridd doctor ...`."""
    parser = argparse.ArgumentParser(prog="hybridd doctor", description=DESCRIPTION)
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
