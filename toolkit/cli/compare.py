"""tk compare WORK_DIR... [--out FIG.png]: loss curves of several runs on one figure, and a table.

Each run is a ``tk train`` work dir: mmengine's ``<timestamp>/vis_data/scalars.json`` gives the train
loss per logged iteration (and ``val/loss`` where the run validated) and tokens/s; the last checkpoint
(adapter-only for adapter runs) gives the trainable parameter count.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError


def latest_scalars(work_dir: Path) -> Path:
    found = sorted(work_dir.glob("*/vis_data/scalars.json"))
    if not found:
        raise UserError(f"{work_dir}: no */vis_data/scalars.json; pass the --work-dir of a `tk train` run")
    return found[-1]


def read_run(work_dir) -> dict:
    """{'name', 'train': [(iter, loss)], 'val': [(iter, loss)], 'tokens_per_sec', 'trainable'}."""
    work_dir = Path(work_dir)
    if not work_dir.is_dir():
        raise UserError(f"{work_dir}: no such work dir")
    train, val, speed = [], [], []
    for line in latest_scalars(work_dir).read_text().splitlines():
        record = json.loads(line)
        step = record.get("step", record.get("iter"))
        if "loss" in record:
            train.append((step, record["loss"]))
            if "tokens_per_sec" in record:
                speed.append((record["tokens_per_sec"], record.get("time", 1.0)))
        if "val/loss" in record:
            val.append((step, record["val/loss"]))
    if not train:
        raise UserError(f"{work_dir}: the run logged no training loss yet")
    steady = speed[1:] or speed                      # the first logged window includes start-up
    seconds = sum(t for _, t in steady)              # tokens / seconds over the logged iterations
    return {"name": work_dir.name, "train": train, "val": val, "trainable": trainable_params(work_dir),
            "tokens_per_sec": sum(v * t for v, t in steady) / seconds if steady else None}


def trainable_params(work_dir: Path):
    """Weights in the newest checkpoint: adapter-only checkpoints hold exactly the trainable ones."""
    checkpoints = sorted(work_dir.glob("*.pth"), key=lambda p: p.stat().st_mtime)
    if not checkpoints:
        return None
    from ..checkpoint import load_model_state
    return sum(t.numel() for t in load_model_state(checkpoints[-1]).values())


def table(runs: list) -> str:
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    rows = [("method", "trainable params", "final train loss", "final val loss", "tokens/s")]
    for run in runs:
        rows.append((run["name"], fmt(run["trainable"], ","), fmt(run["train"][-1][1], ".4f"),
                     fmt(run["val"][-1][1] if run["val"] else None, ".4f"), fmt(run["tokens_per_sec"], ",.0f")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def plot(runs: list, out: Path, title: str | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for i, run in enumerate(runs):
        color = f"C{i}"
        ax.plot(*zip(*run["train"]), color=color, label=f"{run['name']} train")
        if run["val"]:
            ax.plot(*zip(*run["val"]), color=color, linestyle="--", marker="o", markersize=3,
                    label=f"{run['name']} val")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title(title or "training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def run(args) -> int:
    runs = [read_run(w) for w in args.work_dirs]
    if args.names:
        names = args.names.split(",")
        if len(names) != len(runs):
            raise UserError(f"--names has {len(names)} names for {len(runs)} work dirs")
        for r, name in zip(runs, names):
            r["name"] = name
    out = Path(args.out)
    if out.exists() and not args.force:
        raise UserError(f"{out} exists; choose another --out or pass --force to replace it")
    plot(runs, out, args.title)
    print(table(runs))
    print(f"figure saved to {out}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("compare", help="plot the loss curves of several runs and print a table")
    p.add_argument("work_dirs", nargs="+", metavar="WORK_DIR", help="work dirs of `tk train` runs")
    p.add_argument("--out", default="compare.png", help="figure path (PNG)")
    p.add_argument("--names", help="comma-separated labels, one per work dir (default: the folder names)")
    p.add_argument("--title")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=run)
