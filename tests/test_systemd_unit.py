"""The systemd unit: one template for both units, the shipped copies in step with it, systemd's own check, and
`hybridd install-service` writing it with this install's paths."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hybridd.cli.install_service import this_hybridd, verify
from hybridd.systemd.unit import EXAMPLES, WATCHDOG_SEC, UnitSpec, render_unit

REPO = Path(__file__).resolve().parent.parent
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def keys(text: str) -> dict[str, list[str]]:
    """Unit settings by key (a key may repeat), comments and section headers left out."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_shipped_units_are_what_the_template_writes(name: str) -> None:
    shipped = (REPO / "systemd" / name).read_text()
    assert shipped == render_unit(EXAMPLES[name]), "run .venv/bin/python scripts/write_units.py"


def test_both_units_share_the_service_settings() -> None:
    desktop, peer = (keys(render_unit(EXAMPLES[n])) for n in ("hybridd.service", "hybridd-peer.service"))
    for key in ("Type", "NotifyAccess", "WatchdogSec", "KillMode", "TimeoutStopSec", "Restart",
                "RestartPreventExitStatus", "LimitNOFILE"):
        assert desktop[key] == peer[key], key
    assert desktop["WatchdogSec"] == [f"{WATCHDOG_SEC}s"] and desktop["Type"] == ["notify"]
    assert desktop["ExecStart"] == ["%h/hybridd/.venv/bin/hybridd serve"]
    assert peer["ExecStart"] == ["/opt/hybridd/.venv/bin/hybridd serve --role peer"]
    assert "User" not in desktop and peer["User"] == ["hybridd"] and peer["ProtectSystem"] == ["strict"]
    assert desktop["WantedBy"] == ["default.target"] and peer["WantedBy"] == ["multi-user.target"]


def test_exec_start_quotes_and_escapes_what_systemd_would_read_otherwise() -> None:
    spec = UnitSpec(system=True, role="desktop", program=("/opt/my hybridd/bin/hybridd",),
                    config="/etc/100%/$HOME/a\"b.toml")
    assert keys(render_unit(spec))["ExecStart"] == [
        '"/opt/my hybridd/bin/hybridd" serve --config /etc/100%%/$$HOME/a\\"b.toml']


@needs_analyze
@pytest.mark.parametrize("system", [False, True], ids=["user", "system"])
def test_systemd_analyze_passes_the_unit_for_this_install(system: bool) -> None:
    spec = UnitSpec(system=system, role="peer" if system else "desktop", program=this_hybridd(),
                    home=None if system else str(Path.home()))
    assert verify(render_unit(spec), spec, os.environ) == ("", "systemd-analyze verify: ok")


@needs_analyze
def test_systemd_analyze_refuses_a_unit_whose_program_is_missing(tmp_path: Path) -> None:
    spec = UnitSpec(system=True, role="desktop", program=(str(tmp_path / "no-such-hybridd"),))
    problems, _ = verify(render_unit(spec), spec, os.environ)
    assert "no-such-hybridd is not executable" in problems


def install_service(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hybridd", "install-service", *args], capture_output=True, text=True,
                          timeout=60, env=env)


@pytest.fixture
def home(tmp_path: Path) -> dict[str, str]:
    """An environment with a home and XDG_CONFIG_HOME of its own, and no HYBRIDD_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYBRIDD_")}
    env.update(HOME=str(tmp_path / "home"), XDG_CONFIG_HOME=str(tmp_path / "config"), USER="you")
    return env


def test_install_service_writes_the_user_unit_with_this_install_and_says_how_to_enable_it(
        home: dict[str, str], tmp_path: Path) -> None:
    config = tmp_path / "hybridd.toml"
    config.write_text("")
    result = install_service("--user", "--config", str(config), env=home)
    assert result.returncode == 0, result.stderr
    unit = tmp_path / "config" / "systemd" / "user" / "hybridd.service"
    text = unit.read_text()
    venv_hybridd = Path(sys.executable).parent / "hybridd"  # this venv's console script, not a resolved python
    assert keys(text)["ExecStart"] == [f"{venv_hybridd} serve --config {config}"]
    assert oct(unit.stat().st_mode & 0o777) == "0o644"
    checked = "(systemd-analyze verify: ok)" if ANALYZE else "(not checked: systemd-analyze is not installed)"
    assert result.stdout.splitlines()[0] == f"wrote {unit} {checked}"
    assert "systemctl --user daemon-reload && systemctl --user enable --now hybridd" in result.stdout
    assert "loginctl enable-linger you" in result.stdout

    again = install_service("--user", "--config", str(config), env=home)
    assert again.stdout.startswith(f"unchanged: {unit}")


def test_install_service_without_systemd_analyze_still_writes_and_says_it_did_not_check(
        home: dict[str, str], tmp_path: Path) -> None:
    bare = tmp_path / "bin"  # a PATH with no systemd-analyze on it
    bare.mkdir()
    result = install_service("--user", env={**home, "PATH": str(bare)})
    assert result.returncode == 0, result.stderr
    unit = tmp_path / "config" / "systemd" / "user" / "hybridd.service"
    assert result.stdout.splitlines()[0] == f"wrote {unit} (not checked: systemd-analyze is not installed)"


def test_install_service_dry_run_prints_the_unit_and_writes_nothing(home: dict[str, str], tmp_path: Path) -> None:
    result = install_service("--system", "--role", "peer", "--dry-run", "--unit-dir", str(tmp_path / "units"),
                             env=home)
    assert result.returncode == 0, result.stderr
    spec = UnitSpec(system=True, role="peer", program=this_hybridd())
    assert result.stdout == render_unit(spec)
    assert keys(result.stdout)["ExecStart"] == [f"{Path(sys.executable).parent / 'hybridd'} serve --role peer"]
    assert f"it would go to {tmp_path / 'units' / 'hybridd-peer.service'}" in result.stderr
    assert "sudo systemctl daemon-reload && sudo systemctl enable --now hybridd-peer" in result.stderr
    assert not (tmp_path / "units").exists() and not (tmp_path / "config").exists()


def test_install_service_system_peer_writes_where_asked(home: dict[str, str], tmp_path: Path) -> None:
    result = install_service("--system", "--role", "peer", "--unit-dir", str(tmp_path / "units"), env=home)
    assert result.returncode == 0, result.stderr
    unit = keys((tmp_path / "units" / "hybridd-peer.service").read_text())
    assert unit["User"] == ["hybridd"] and unit["ExecStart"][0].endswith(" serve --role peer")
    assert "the service reads /etc/hybridd/config.toml" in result.stdout


def test_install_service_that_cannot_write_says_so_and_exits_1(home: dict[str, str], tmp_path: Path) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    result = install_service("--user", "--unit-dir", str(blocked / "units"), env=home)
    assert result.returncode == 1
    assert result.stderr.startswith(f"hybridd install-service: cannot write {blocked / 'units' / 'hybridd.service'}")
