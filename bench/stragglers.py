"""Stragglers: synchronous FedAvg against FedBuff (--mode fedbuff) with one client slowed 4x.

    python bench/stragglers.py [--data ../shared/data/cifar10-jpeg.tar.gz] [--rounds 12]
        [--versions 16] [--buffer-size 3] [--concurrency 4] [--quick]

The reference job (the small CNN on CIFAR-10, 1 local epoch, Adam 1e-3) with 4 clients, each a
real fl-client process beside a real fl-server (fl-local's run_federation, every client in
parallel). Client 4 is the straggler: after each local training it sleeps 3x the time that
training took (the throttle of bench/tasks/throttled_cifar10.py, a bench-only task; nothing in the
product slows a client), so each of its rounds takes 4x as long as the others'.

  sync     --rounds R of FedAvg: every round waits for the straggler.
  fedbuff  --versions V aggregations, each of --buffer-size K updates from --concurrency C
           clients training at once, weighted 1/sqrt(1+staleness) (the paper's default).

Wall time is the server's own: the sum of its rounds' (versions') seconds, from the first
opening to the last record, central evaluation on the 10,000 test images included and process
start-up excluded. Reported: wall time to --target accuracy (0.65), the accuracy of each at
the same wall time (the shorter run's end), and the final accuracy. Goal: FedBuff reaches the
target in at most 0.6x the synchronous wall time, its final accuracy within 1 point.

Prints a table, writes JSON and a plot (bench/results/stragglers.{json,png}; an SVG drawn by
hand where matplotlib is missing). --quick: 3 rounds against 4 versions on 1,500 training
examples a client and 2,000 test images, a sanity check of the harness (minutes), whose
accuracies mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
TASK = Path(__file__).resolve().parent / "tasks" / "throttled_cifar10.py"
CLIENTS = 4
SLOW_CLIENT = 4
SLOWDOWN = 3.0  # the straggler sleeps 3x its training time: 4x as long a round


def run(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One real federation; its records as (wall time so far, accuracy, ...)."""
    from fedgrpc.server.local import run_federation

    mode = [
        *("--mode", "fedbuff", "--buffer-size", str(args.buffer_size)),
        *("--concurrency", str(args.concurrency), "--max-staleness", str(args.max_staleness)),
    ]
    mode = mode if name == "fedbuff" else []
    params = [f"slow_client={SLOW_CLIENT}", f"slowdown={SLOWDOWN}"]
    if args.quick:
        params += ["train_examples=1500", "test_examples=2000"]
    out = work / name
    code = run_federation(
        clients=CLIENTS,
        rounds=args.versions if name == "fedbuff" else args.rounds,
        data=args.data,
        out_dir=out,
        task=str(TASK),
        threads=max(1, (os.cpu_count() or 1) // CLIENTS),
        schedule="parallel",  # taking turns would make the straggler's sleep hold the others up
        server_args=[
            *("--partition-seed", str(args.seed), "--init-seed", str(args.init_seed), "--eval-every", "0"),
            *[flag for param in params for flag in ("--param", param)],
            *mode,
        ],
        logs_dir=work / f"logs-{name}",
    )
    if code != 0:
        for log in sorted((work / f"logs-{name}").glob("*.log")):
            print(f"--- {log.name}\n{log.read_text()[-3000:]}", file=sys.stderr)
        raise SystemExit(f"the {name} run failed")
    rounds = json.loads((out / "history.json").read_text())["rounds"]
    wall, points = 0.0, []
    for record in rounds:
        wall += record["seconds"]
        staleness = list((record.get("staleness") or {}).values())
        points.append(
            {
                "round": record["round"],
                "wall_s": round(wall, 3),
                "accuracy": record["central"]["accuracy"],
                "clients": sorted(c["client_id"] for c in record["clients"]),
                "staleness": staleness,
            }
        )
    return {"name": name, "points": points}


def time_to(points: list[dict[str, Any]], target: float) -> float | None:
    return next((p["wall_s"] for p in points if p["accuracy"] >= target), None)


def accuracy_at(points: list[dict[str, Any]], wall_s: float) -> float | None:
    """The accuracy of the last record made by `wall_s` (None: none was)."""
    made = [p["accuracy"] for p in points if p["wall_s"] <= wall_s + 1e-9]
    return made[-1] if made else None


def summarize(sync: list[dict[str, Any]], buffered: list[dict[str, Any]], target: float) -> dict[str, Any]:
    t_sync, t_buff = time_to(sync, target), time_to(buffered, target)
    equal = min(sync[-1]["wall_s"], buffered[-1]["wall_s"])
    ratio = t_buff / t_sync if t_sync and t_buff else None
    final_gap = buffered[-1]["accuracy"] - sync[-1]["accuracy"]
    return {
        "target": target,
        "time_to_target_s": {"sync": t_sync, "fedbuff": t_buff},
        "time_ratio": ratio,
        "equal_wall_s": equal,
        "accuracy_at_equal_wall": {"sync": accuracy_at(sync, equal), "fedbuff": accuracy_at(buffered, equal)},
        "final_accuracy": {"sync": sync[-1]["accuracy"], "fedbuff": buffered[-1]["accuracy"]},
        "total_wall_s": {"sync": sync[-1]["wall_s"], "fedbuff": buffered[-1]["wall_s"]},
        "goals": {
            "time_ratio<=0.6": ratio is not None and ratio <= 0.6,
            "final_within_1_point": final_gap >= -0.01,
        },
    }


def table(summary: dict[str, Any]) -> str:
    def cell(value: float | None, form: str) -> str:
        return "-" if value is None else format(value, form)

    rows = [
        (f"wall s to accuracy {summary['target']:.2f}", "time_to_target_s", ".1f"),
        (f"accuracy at {summary['equal_wall_s']:.0f} s", "accuracy_at_equal_wall", ".4f"),
        ("final accuracy", "final_accuracy", ".4f"),
        ("total wall s", "total_wall_s", ".1f"),
    ]
    lines = [f"{'':<28} {'sync FedAvg':>12} {'FedBuff':>10}", "-" * 52]
    for label, key, form in rows:
        lines.append(
            f"{label:<28} {cell(summary[key]['sync'], form):>12} {cell(summary[key]['fedbuff'], form):>10}"
        )
    lines.append("-" * 52)
    lines.append(f"FedBuff / sync time to target: {cell(summary['time_ratio'], '.2f')} (goal <= 0.60)")
    return "\n".join(lines)


def plot(runs: dict[str, list[dict[str, Any]]], target: float, path: Path) -> Path:
    """Accuracy against wall time; matplotlib where the venv has it, else an SVG by hand."""
    try:
        import matplotlib
    except ImportError:
        return _svg(runs, target, path.with_suffix(".svg"))
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4))
    for name, points in runs.items():
        axis.plot([p["wall_s"] for p in points], [p["accuracy"] for p in points], marker="o", label=name)
    axis.axhline(target, color="grey", linestyle="--", linewidth=1)
    axis.set(xlabel="server wall time (s)", ylabel="test accuracy", title="One client 4x slower")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _svg(runs: dict[str, list[dict[str, Any]]], target: float, path: Path) -> Path:
    width, height, pad = 640, 400, 50
    longest = max(p["wall_s"] for points in runs.values() for p in points) or 1.0

    def xy(wall: float, accuracy: float) -> str:
        x = pad + wall / longest * (width - 2 * pad)
        return f"{x:.1f},{height - pad - accuracy * (height - 2 * pad):.1f}"

    lines = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">']
    lines.append(f'<polyline points="{xy(0, target)} {xy(longest, target)}" stroke="grey" fill="none"/>')
    for (name, points), colour in zip(runs.items(), ("#4c78a8", "#e45756"), strict=False):
        coords = " ".join(xy(p["wall_s"], p["accuracy"]) for p in points)
        lines.append(f'<polyline points="{coords}" stroke="{colour}" fill="none" stroke-width="2"/>')
        last = points[-1]
        x, y = xy(last["wall_s"], last["accuracy"]).split(",")
        lines.append(f'<text x="{x}" y="{y}" fill="{colour}">{name}</text>')
    lines.append(f'<text x="{pad}" y="{height - 10}">server wall time (s), 0 to {longest:.0f}</text>')
    lines.append("</svg>")
    path.write_text("\n".join(lines))
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--rounds", type=int, default=12, help="synchronous FedAvg's rounds (default 12)")
    p.add_argument("--versions", type=int, default=16, help="FedBuff's aggregations (default 16)")
    p.add_argument("--buffer-size", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=CLIENTS)
    p.add_argument("--max-staleness", type=int, default=8)
    p.add_argument("--target", type=float, default=0.65)
    p.add_argument("--seed", type=int, default=42, help="partition seed")
    p.add_argument("--init-seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="3 rounds vs 4 versions on a subset: a sanity check")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "stragglers.json")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.versions = 3, 4
    if not Path(args.data).exists():
        raise SystemExit(f"no data at {args.data}; pass --data")
    from fedgrpc.common.data import load_split

    load_split(args.data, "test")  # decode (or find) the cache before anything is timed
    runs: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="fedgrpc-stragglers-") as tmp:
        for name in ("sync", "fedbuff"):
            print(
                f"{name}: fl-server + {CLIENTS} fl-client processes, client {SLOW_CLIENT} slowed 4x",
                flush=True,
            )
            runs[name] = run(name, args, Path(tmp))["points"]
            for point in runs[name]:
                print(
                    f"  {name} {point['round']:>3}  {point['wall_s']:>8.1f} s  acc {point['accuracy']:.4f}"
                    f"  clients {point['clients']}  staleness {point['staleness']}",
                    flush=True,
                )
    summary = summarize(runs["sync"], runs["fedbuff"], args.target)
    print()
    print(table(summary))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "runs": runs,
        "summary": summary,
    }
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    figure = plot(runs, args.target, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {figure}")
    return 0 if args.quick or all(summary["goals"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
