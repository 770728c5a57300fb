"""Training curves of one or more runs as one PNG: `python plot.py runs/a [runs/b ...] --out plot.png`.

Reads each run's metrics.jsonl (rows with "val_bpb" are evals, the rest training steps) and draws
loss, val bits/byte, learning rate, gradient norm, loss scale and, when logged, max |attention score| and
the benchmarks of --eval-tasks (HellaSwag acc_norm, LAMBADA accuracy, WikiText-103 word perplexity)
against step or (--x elapsed) seconds of training. Not in here: computing any metric (train.py logs them,
eval.py scores checkpoints).
"""
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro

from errors import UserError, metrics_rows, run_cli

PANELS = (  # (metrics key, title, which rows, log-scale y)
    ("loss", "train loss (nats/token)", "train", False),
    ("val_bpb", "val bits/byte", "eval", False),
    ("lr", "learning rate", "train", False),
    ("grad_norm", "gradient norm (before clipping)", "train", True),
    ("loss_scale", "loss scale", "train", True),
    ("attn_max_score", "max |attention score| (over layers)", "train", True),
    ("hellaswag_acc_norm", "HellaSwag acc_norm", "eval", False),
    ("lambada_acc", "LAMBADA accuracy (last word, greedy)", "eval", False),
    ("wikitext_word_ppl", "WikiText-103 word perplexity", "eval", True),
)
OPTIONAL_PANELS = ("attn_max_score", "hellaswag_acc_norm", "lambada_acc", "wikitext_word_ppl")
"""Drawn only when some run logged them (diagnostics and --eval-tasks are optional)."""


@dataclass
class PlotConfig:
    """Which runs to draw and where to write the picture."""

    runs: tyro.conf.Positional[tuple[Path, ...]]
    """Run directories, each holding a metrics.jsonl."""
    out: Path = Path("plot.png")
    """PNG file to write."""
    x: Literal["step", "elapsed"] = "step"
    """Horizontal axis: optimizer step, or elapsed seconds of training (continues across resume)."""
    panels: tuple[str, ...] = ()
    """Draw only these panels, by metrics key (e.g. val_bpb); default: all."""


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows) of run_dir/metrics.jsonl; a half-written last line (a live run) is skipped, a bad
    line before it is one line naming it."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path}: not found — is {run_dir} a run directory?")
    rows = metrics_rows(path)
    return [r for r in rows if "val_bpb" not in r], [r for r in rows if "val_bpb" in r]


def series(rows: list[dict], key: str, x: str = "step") -> tuple[list[float], list[float]]:
    """x (step or elapsed) and values of key where both are present; a per-layer list becomes its max."""
    xs, values = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, list):
            value = max(value) if value else None
        if value is not None and row.get(x) is not None:  # runs logged before `elapsed` existed have no x
            xs.append(row[x])
            values.append(value)
    return xs, values


def shown_panels(metrics: dict, only: tuple[str, ...] = ()) -> list[tuple]:
    """PANELS (or those named in only), less the optional ones no run logged; metrics maps a run to its
    (train rows, eval rows)."""
    def logged(key, which):
        return any(series(train if which == "train" else evals, key)[0] for train, evals in metrics.values())

    return [panel for panel in PANELS if (not only or panel[0] in only)
            and (panel[0] not in OPTIONAL_PANELS or logged(panel[0], panel[2]))]


def plot(run_dirs, out: Path, x: str = "step", only: tuple[str, ...] = ()) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plot.py needs matplotlib — pip install matplotlib") from None
    if not run_dirs:
        raise UserError("name at least one run directory: python plot.py runs/a [runs/b ...] --out plot.png")
    kinds = plt.figure().canvas.get_supported_filetypes()  # matplotlib picks the format by the extension
    plt.close("all")
    if out.suffix[1:].lower() not in kinds:  # none: it would write OUT.png and say OUT; another: a traceback
        raise UserError(f"--out {out}: name the picture with its file type, one of "
                        f"{', '.join('.' + kind for kind in ('png', 'pdf', 'svg') if kind in kinds)}, ...")
    if out.is_dir() or not out.parent.is_dir():
        raise UserError(f"--out {out}: " + ("is a directory" if out.is_dir() else f"{out.parent} does not exist"))
    metrics = {str(run): read_metrics(run) for run in run_dirs}
    if not any(train or evals for train, evals in metrics.values()):  # else blank panels and "wrote ..."
        raise UserError(f"{', '.join(metrics)}: no rows in metrics.jsonl yet — nothing to draw")
    unknown = set(only) - {p[0] for p in PANELS}
    if unknown:
        raise UserError(f"--panels {' '.join(sorted(unknown))}: no such panel; choose from "
                        f"{' '.join(p[0] for p in PANELS)}")
    panels = shown_panels(metrics, only)
    if not panels:
        raise UserError(f"--panels {' '.join(only)}: none of these was logged by {' '.join(metrics)}")
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 4 * rows), squeeze=False)
    for ax, (key, title, which, log_y) in zip(axes.flat, panels):
        for run, (train, evals) in metrics.items():
            xs, values = series(train if which == "train" else evals, key, x)
            line, = ax.plot(xs, values, label=run, marker="o" if which == "eval" else None, markersize=3)
            if key == "loss":  # val loss beside train loss, same colour: the gap is overfitting
                ax.plot(*series(evals, "val_loss", x), linestyle="--", color=line.get_color(), label=f"{run} (val)")
        ax.set(title=title, xlabel="step" if x == "step" else "seconds of training", yscale="log" if log_y else "linear")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None):
    cfg = tyro.cli(PlotConfig, args=argv, prog="plot.py")
    print(f"wrote {plot(cfg.runs, cfg.out, cfg.x, cfg.panels)}")


if __name__ == "__main__":
    run_cli(main)
