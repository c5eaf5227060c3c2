"""The package builds without warnings and carries the dashboard's files."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_builds_quietly_and_holds_the_dashboard(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("common", "server", "client", "proto"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", str(tmp_path / "wheel"), str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "would be ignored" not in result.stdout + result.stderr
    (wheel,) = (tmp_path / "wheel").glob("fedgrpc-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for static in ("index.html", "app.js", "app.css", "uPlot.iife.min.js"):
        assert f"fedgrpc/server/web/{static}" in names
