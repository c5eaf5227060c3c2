import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_robust_strategies_shrug_off_one_poisoned_client(tmp_path: Path) -> None:
    out = tmp_path / "poisoning.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "poisoning.py"), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=1800,  # the benchmark takes minutes on a loaded machine; a hang fails here
    )
    assert result.returncode == 0, result.stdout + result.stderr
    table = json.loads(out.read_text())["accuracy"]
    assert table["fedavg"]["none"] - min(table["fedavg"]["sign-flip"], table["fedavg"]["noise"]) > 0.10
    for name in ("median", "trimmed-mean", "krum"):
        clean = table[name]["none"]
        assert clean > 0.7
        assert clean - min(table[name]["sign-flip"], table[name]["noise"]) <= 0.02, (name, table[name])
