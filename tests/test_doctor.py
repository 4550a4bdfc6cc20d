"""`hybridd doctor`: each check against real things (scripts on PATH, sockets, folders, servers), and the command."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from hybridd.cli import doctor
from hybridd.cli.doctor import (
    ACCEPT,
    DROP,
    FAIL,
    OK,
    UNKNOWN,
    WARN,
    Check,
    check_config,
    check_engines,
    check_firewall,
    check_gpus,
    check_peers,
    check_ports,
    check_state_dir,
    iptables_verdict,
    nft_verdict,
    render,
    ufw_verdict,
)
from hybridd.config import Config, ServerConfig, parse_config
from hybridd.peer.identity import new_identity
from hybridd.peer.tls import server_context
from tests.test_probe import GIB, FakeGpu, FakeNvml
from tests.tls_server import serve

REPO = Path(__file__).resolve().parent.parent

NFT_DROPS = """table inet filter {
\tchain input {
\t\ttype filter hook input priority filter; policy drop;
\t\tct state established,related accept
\t\tiif "lo" accept
\t\ttcp dport 22 accept comment "ssh"
\t\tcounter packets 0 bytes 0 drop
\t}
}
"""
NFT_ALLOWS = """table inet filter {
\tset allowed {
\t\ttype inet_service
\t\telements = { 22, 5353 }
\t}
\tchain input {
\t\ttype filter hook input priority filter; policy drop;
\t\tct state established,related accept
\t\tjump lan
\t}
\tchain lan {
\t\tudp dport 5353 accept
\t\ttcp dport { 22, 11000-12000 } accept
\t}
}
"""
NFT_LAN_ONLY = """table inet filter {
\tchain input {
\t\ttype filter hook input priority filter; policy drop;
\t\tip saddr 192.168.1.0/24 accept
\t}
}
"""
IPTABLES = """-P INPUT DROP
-P FORWARD DROP
-P OUTPUT ACCEPT
-N lan
-A INPUT -i lo -j ACCEPT
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A INPUT -m conntrack --ctstate INVALID -j DROP
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
-A INPUT -j lan
-A lan -p udp -m udp --dport 5353 -j ACCEPT
-A lan -j RETURN
"""
UFW = """Status: active
Logging: on (low)
Default: deny (incoming), allow (outgoing), disabled (routed)
New profiles: skip

To                         Action      From
--                         ------      ----
22/tcp                     ALLOW IN    Anywhere
11436/tcp                  ALLOW IN    192.168.1.0/24
5353/udp                   ALLOW IN    Anywhere
22/tcp (v6)                ALLOW IN    Anywhere (v6)
"""


def _script(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def _env(tmp_path: Path, bin_dir: Path) -> dict[str, str]:
    """This process's environment with bin_dir first on PATH and every XDG folder under tmp_path."""
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "XDG_CONFIG_HOME": str(tmp_path / "config"),
            "XDG_STATE_HOME": str(tmp_path / "state"), "XDG_CACHE_HOME": str(tmp_path / "cache")}


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port some other program listens on: it hangs up on whoever connects, without a word of HTTP."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()

        def hang_up() -> None:
            while True:
                try:
                    conn, _ = sock.accept()
                except OSError:  # the listener was shut down: the test is over
                    return
                conn.close()

        thread = threading.Thread(target=hang_up)
        thread.start()
        try:
            yield sock.getsockname()[1]
        finally:
            sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept
            thread.join()


# The firewall readers, on canned rule sets.

def test_nft_policy_drop_drops_what_no_rule_accepts() -> None:
    assert nft_verdict(NFT_DROPS, "udp", 5353) == DROP
    assert nft_verdict(NFT_DROPS, "tcp", 22) == ACCEPT


def test_nft_rules_in_a_jumped_chain_with_sets_and_ranges() -> None:
    assert nft_verdict(NFT_ALLOWS, "udp", 5353) == ACCEPT
    assert nft_verdict(NFT_ALLOWS, "tcp", 11436) == ACCEPT
    assert nft_verdict(NFT_ALLOWS, "tcp", 8080) == DROP


def test_nft_a_source_address_rule_makes_it_unknown() -> None:
    assert nft_verdict(NFT_LAN_ONLY, "udp", 5353) == UNKNOWN
    assert nft_verdict("table inet filter {\n}\n", "udp", 5353) == ACCEPT  # no input hook: nothing filters


def test_iptables_rules_and_policy() -> None:
    assert iptables_verdict(IPTABLES, "udp", 5353) == ACCEPT
    assert iptables_verdict(IPTABLES, "tcp", 11436) == DROP
    assert iptables_verdict("-P INPUT ACCEPT\n", "tcp", 11436) == ACCEPT
    assert iptables_verdict("-P INPUT DROP\n-A INPUT -s 10.0.0.0/8 -j ACCEPT\n", "tcp", 11436) == UNKNOWN
    assert iptables_verdict("-P INPUT ACCEPT\n-A INPUT -p tcp -m multiport --dports 11000:12000 -j REJECT\n",
                            "tcp", 11436) == DROP


def test_ufw_rules_default_and_inactive() -> None:
    assert ufw_verdict(UFW, "udp", 5353) == ACCEPT
    assert ufw_verdict(UFW, "tcp", 11436) == UNKNOWN  # allowed from the LAN only: cannot tell for this packet
    assert ufw_verdict(UFW, "tcp", 8080) == DROP
    assert ufw_verdict("Status: inactive\n", "tcp", 11436) == ACCEPT


def test_firewall_tools_run_from_path(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    rules = tmp_path / "ruleset"
    rules.write_text(NFT_DROPS)
    _script(bin_dir, "nft", f"cat {rules}\n")
    _script(bin_dir, "iptables", "echo 'iptables v1.8.9 (nf_tables): Permission denied (you must be root)' >&2\n"
                                 "exit 4\n")
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    checks = check_firewall(Config(), env)
    assert checks[0] == Check("mdns", WARN, "UDP 5353 is dropped by nft: it blocks discovery of peers on the LAN",
                              "allow it: sudo ufw allow 5353/udp, or sudo nft add rule inet filter input udp dport "
                              "5353 accept")
    peer = check_firewall(parse_config('[node]\nrole = "peer"\n'), env)[1]
    assert (peer.status, peer.detail) == (FAIL, "TCP 11436 is dropped by nft: it blocks paired desktops reaching "
                                                "this node")


def test_an_unreadable_firewall_is_unknown_and_none_is_ok(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    _script(bin_dir, "nft", "echo 'Error: Operation not permitted' >&2\nexit 1\n")
    checks = check_firewall(Config(), {"PATH": str(bin_dir)})
    assert checks[0].status == WARN
    assert checks[0].detail == "UDP 5353: unknown (nft: Error: Operation not permitted)"
    empty = check_firewall(Config(), {"PATH": str(tmp_path / "empty")})
    assert [c.status for c in empty] == [OK, OK]


# The machine.

def test_gpus_driver_nvml_and_a_crowded_display_gpu(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    _script(bin_dir, "nvidia-smi", "echo '570.86.16, NVIDIA GeForce RTX 4090'\n"
                                   "echo '570.86.16, NVIDIA GeForce RTX 5070 Ti'\n")
    nvml = FakeNvml([FakeGpu("NVIDIA GeForce RTX 4090", 24 * GIB, 22 * GIB, display_active=1),
                     FakeGpu("NVIDIA GeForce RTX 5070 Ti", 16 * GIB, 2 * GIB, processes=[(4242, 14 * GIB)])])
    checks, snapshot = check_gpus(nvml, {"PATH": str(bin_dir)})
    assert len(snapshot.gpus) == 2
    assert checks[:3] == [
        Check("nvidia driver", OK, "driver 570.86.16, nvidia-smi shows 2 GPUs"),
        Check("nvml", OK, "NVML sees 2 GPUs"),
        Check("gpu 0", OK, "NVIDIA GeForce RTX 4090: 22.0 of 24.0 GiB free, drives a display (1 GiB kept back for it)"),
    ]
    assert checks[3].status == WARN and checks[3].detail.endswith("other programs hold the rest (pids 4242)")


def test_no_driver_is_a_warning_not_a_failure(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    _script(bin_dir, "nvidia-smi", "echo \"NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA "
                                   "driver.\"\nexit 9\n")
    checks, snapshot = check_gpus(FakeNvml([], init_error=9), {"PATH": str(bin_dir)})
    assert snapshot.cpu_only
    assert checks[0].status == WARN and "couldn't communicate with the NVIDIA driver" in checks[0].detail
    assert checks[1] == Check("nvml", OK, "CPU-only: NVML unavailable (NVIDIA driver not loaded): placement plans "
                                          "this node as CPU-only")


def test_a_cpu_engine_beside_gpus_is_a_warning_with_the_rebuild(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    python = _script(bin_dir, "python", 'echo \'{"installed": true, "version": "0.3.36", "gpu_offload": false}\'\n')
    _script(bin_dir, "nvcc", "echo 'Cuda compilation tools, release 12.8'\n")
    _script(bin_dir, "llama-server", 'case "$1" in --list-devices) printf "Available devices:\\n  (none)\\n";; '
                                     '--version) echo "version: 6000 (abc)" >&2;; esac\n')
    config = parse_config(f'[engine]\npython = "{python}"\n')
    checks = check_engines(config, 2, {"PATH": str(bin_dir)})
    assert checks[0] == Check("llama-cpp-python", WARN, "engine llama-cpp-python is a CPU build: 2 GPUs unused; "
                              f"llama-cpp-python 0.3.36 ({python}): CPU only",
                              "hybridd engines build llama-cpp-python --cuda")
    assert checks[1].status == WARN and checks[1].detail.startswith("engine llama-server is a CPU build: 2 GPUs unused")
    assert checks[2] == Check("cuda toolkit", OK, f"nvcc at {bin_dir / 'nvcc'}")


def test_an_engine_the_models_use_but_missing_fails(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    python = _script(bin_dir, "python", 'echo \'{"installed": false, "error": "No module named llama_cpp"}\'\n')
    config = parse_config(f'[engine]\npython = "{python}"\n')
    checks = check_engines(config, 0, {"PATH": str(bin_dir), "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert checks[0] == Check("llama-cpp-python", FAIL, "not installed (No module named llama_cpp), and the config's "
                              "models use it", f"{python} -m pip install llama-cpp-python")
    assert checks[1].status == OK and "only needed for engine = \"llama-server\"" in checks[1].detail


# Config, ports, state.

def test_a_bad_config_fails_with_the_loaders_message(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[server]\nlisten = "nowhere"\n')
    checks, config = check_config(path, {})
    assert checks == [Check("config", FAIL, f'{path}: server.listen: expected "host:port" (e.g. "127.0.0.1:11435"), '
                            'got "nowhere"', "fix the key the message names, then run 'hybridd doctor' again")]
    assert config == Config()


def test_a_good_config_with_a_missing_model_file(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[[models]]\nname = "qwen"\npath = "qwen.gguf"\n')
    checks, config = check_config(path, {})
    assert checks[0] == Check("config", OK, f"{path}: 1 model, 0 configured peers")
    assert checks[1].name == "model qwen" and checks[1].status == WARN
    assert [m.name for m in config.models] == ["qwen"]
    assert check_config(None, {"XDG_CONFIG_HOME": str(tmp_path / "none")})[0][0].status == OK


def test_a_port_another_program_holds_fails(taken_port: int) -> None:
    config = Config(server=ServerConfig(port=taken_port))
    checks, daemon = check_ports(config)
    assert daemon is None
    assert checks[0].status == FAIL and checks[0].detail == f"127.0.0.1:{taken_port}: in use by another program"
    free_checks, _ = check_ports(Config(server=ServerConfig(port=0)))
    assert free_checks[0].status == OK


def _fake_daemon(peers: object) -> web.Application:
    app = web.Application()

    async def status(request: web.Request) -> web.Response:
        return web.json_response({"version": "0.1.0", "pid": 4242})

    async def peers_route(request: web.Request) -> web.Response:
        return web.json_response(peers)

    app.router.add_get("/hybridd/v1/status", status)
    app.router.add_get("/hybridd/v1/peers", peers_route)
    return app


async def _listen(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


async def test_the_port_of_a_running_hybridd_is_ok_and_its_peers_are_asked() -> None:
    peer_app = web.Application()

    async def paired_only(request: web.Request) -> web.Response:  # what an unpaired client gets, with a Date
        return web.Response(status=403, headers={"Date": "Thu, 26 Nov 2026 12:00:10 GMT"})

    peer_app.router.add_get("/{tail:.*}", paired_only)
    spark = new_identity("spark")
    async with serve(peer_app, server_context(spark, [])) as peer_url:
        peer_port = int(peer_url.rsplit(":", 1)[1])
        paired = [{"name": "spark", "address": "127.0.0.1", "port": peer_port, "link": "up", "rtt_ms": 0.4},
                  {"name": "gone", "address": "127.0.0.1", "port": 1, "link": "down", "down_reason": "refused"}]
        runner, port = await _listen(_fake_daemon({"paired": paired, "discovered": []}))
        try:
            checks, daemon = await asyncio.to_thread(check_ports, Config(server=ServerConfig(port=port)))
            assert checks == [Check("listen port", OK, f"127.0.0.1:{port} is the running hybridd 0.1.0 (pid 4242)")]
            noon = 1795694400.0  # Thu, 26 Nov 2026 12:00:00 GMT: the peer's clock is 10 s ahead
            peers = await asyncio.to_thread(check_peers, daemon, lambda: noon)
        finally:
            await runner.cleanup()
    assert peers[0] == Check("peer spark", WARN, f"127.0.0.1:{peer_port}: link up, clock skew +10 s",
                             "turn on NTP on both machines: sudo timedatectl set-ntp true")
    assert peers[1].status == WARN and peers[1].detail == "127.0.0.1:1: link down (refused), clock skew unknown"


def test_state_dir_permissions(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    config = Config(state_dir=folder)
    assert check_state_dir(config, {}) == Check(
        "state dir", WARN, f"{folder} is mode 0755: other users can read this node's private key and its paired "
        "peers", f"chmod 700 {folder}")
    folder.chmod(0o700)
    assert check_state_dir(config, {}).status == OK
    assert check_state_dir(Config(state_dir=tmp_path / "later"), {}).status == OK


def test_render_puts_the_fix_under_the_check_and_counts() -> None:
    text = render([Check("config", OK, "fine"), Check("mdns", WARN, "dropped", "allow it")])
    assert text == "ok    config  fine\nwarn  mdns    dropped\n              -> allow it\n\n1 ok, 1 warn, 0 fail: " \
                   "nothing blocks serving"


# The command, as a real process.

def _doctor(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hybridd.cli.doctor", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120, check=False)


def test_doctor_command_fails_on_a_bad_config_and_a_taken_port(tmp_path: Path, taken_port: int) -> None:
    bin_dir = tmp_path / "bin"
    rules = tmp_path / "ruleset"
    rules.write_text(NFT_DROPS)
    _script(bin_dir, "nft", f"cat {rules}\n")
    env = _env(tmp_path, bin_dir)
    (tmp_path / "config" / "hybridd").mkdir(parents=True)
    (tmp_path / "config" / "hybridd" / "config.toml").write_text("[server]\nlisten = 5\n")
    done = _doctor(tmp_path, env, "--json")
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    by_name = {c["name"]: c for c in report["checks"]}
    assert by_name["config"]["status"] == FAIL and "server.listen" in by_name["config"]["detail"]
    assert by_name["mdns"]["status"] == WARN
    assert report["exit_code"] == 1 and report["fail"] >= 1
    config = tmp_path / "taken.toml"
    config.write_text(f'[server]\nlisten = "127.0.0.1:{taken_port}"\n')
    text = _doctor(tmp_path, env, "--config", str(config))
    assert text.returncode == 1
    assert f"fail  listen port         127.0.0.1:{taken_port}: in use by another program" in text.stdout


def test_doctor_command_passes_on_a_fresh_install(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    python = _script(bin_dir, "python", 'echo \'{"installed": true, "version": "0.3.36", "gpu_offload": false}\'\n')
    env = _env(tmp_path, bin_dir)
    config = tmp_path / "config.toml"
    config.write_text(f'[server]\nlisten = "127.0.0.1:0"\n[engine]\npython = "{python}"\n')
    done = _doctor(tmp_path, env, "--config", str(config))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 fail: nothing blocks serving" in done.stdout
    assert f"llama-cpp-python 0.3.36 ({python}): CPU only" in done.stdout


def test_run_in_process_returns_the_exit_code(tmp_path: Path) -> None:
    out = io.StringIO()
    env = _env(tmp_path, tmp_path / "bin")
    args = argparse.Namespace(json=False, config=None)
    assert doctor.run(args, out, env, nvml=FakeNvml([]), use_real_nvml=False) == 0
    assert "nothing blocks serving" in out.getvalue()
