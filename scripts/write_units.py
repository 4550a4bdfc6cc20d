"""Rewrite systemd/*.service from hybridd/systemd/unit.py (tests/test_systemd_unit.py fails until they match)."""

from pathlib import Path

from hybridd.systemd.unit import EXAMPLES, render_unit

folder = Path(__file__).resolve().parent.parent / "systemd"
for name, spec in EXAMPLES.items():
    (folder / name).write_text(render_unit(spec))
    print(f"wrote {folder / name}")
