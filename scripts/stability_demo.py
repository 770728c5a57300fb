"""The Mistral blow-up, reproduced on a CPU: two fp16 runs from one seed, stability fixes off vs on.

    python scripts/stability_demo.py [--lr 0.06] [--steps 300]      (or: make stability-demo)

The knob is the learning rate: at --lr 6e-2 (the default) with no weight decay or clipping, AdamW grows W_q and W_k
fast, and the raw scores q·kᵀ — a product of the two — pass fp16's 65504 within a few hundred steps,
long before any linear layer's outputs get near it. Without the fixes the naive attention path
computes q·kᵀ in fp16: inf, then NaN, every step skipped, the loss scale collapses and the run aborts.
With them (fp32 scores, 1/layer scaling) the same run trains on. Nothing is injected. Writes both runs'
metrics and stability.png (loss, loss scale, max |attention score| per step) to --out-dir.
"""
import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repo's modules

from configs import PRESETS, CheckpointConfig, LossScaleConfig, OptimConfig  # noqa: E402
from errors import metrics_rows  # noqa: E402
from train import train  # noqa: E402

ARMS = {"fixes off": dict(upcast_attn=False, scale_attn_by_layer_idx=False),
        "fixes on": dict(upcast_attn=True, scale_attn_by_layer_idx=True)}


def arm_config(args, name: str, flags: dict):
    base = PRESETS["shakespeare-cpu"][1]
    model = replace(base.model, attn_impl="naive", n_layer=args.layers, n_head=2, n_embd=args.width,
                    block_size=args.context, **flags)
    return replace(base, model=model, precision="fp16", max_steps=args.steps, global_batch_size=args.batch,
                   micro_batch_size=args.batch,
                   optim=OptimConfig(lr=args.lr, min_lr=args.lr, warmup_steps=1, decay="constant", weight_decay=0.0,
                                     grad_clip=0.0, beta2=0.99),
                   loss_scale=LossScaleConfig(max_consecutive_skips=25), log_interval=1, diag_interval=1,
                   eval_interval=10**9, eval_batches=4, final_eval_batches=16, seed=args.seed, resume="none",
                   checkpoint=CheckpointConfig(schedule="none", keep_last=1),
                   out_dir=args.out_dir / name.replace(" ", "-"))


def run_arm(cfg) -> str:
    """Train one arm; a blow-up is an outcome to show, not an error."""
    import shutil

    shutil.rmtree(cfg.out_dir, ignore_errors=True)
    try:
        result = train(cfg)
        return f"trained {result['step']} steps, val bits/byte {result['val_bpb']:.3f}"
    except FloatingPointError as err:
        return f"ABORTED: {err}".split(". Last diagnostics")[0]


def plot(out_dir: Path, outcomes: dict, head_size: int) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("the plot needs matplotlib: pip install matplotlib (the runs' metrics are written already)")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name in ARMS:
        rows = metrics_rows(out_dir / name.replace(" ", "-") / "metrics.jsonl")
        rows = [r for r in rows if "loss" in r]
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r["loss"] for r in rows], label=name)
        axes[1].plot(steps, [r["loss_scale"] for r in rows], label=name)
        axes[2].plot(steps, [max(r.get("attn_max_score") or [float("nan")]) for r in rows], label=name)
    # the logged score is after scaling; without upcast the raw q·kᵀ (= score·√hs in layer 1) is what overflows
    axes[2].axhline(65504 / head_size**0.5, color="grey", linestyle=":", label="65504/√hs: raw q·kᵀ hits fp16 max")
    for ax, title in zip(axes, ("training loss (NaN not drawn)", "loss scale", "max |attention score| (scaled)")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    axes[1].set_yscale("log", base=2)
    axes[2].set_yscale("log")
    fig.suptitle(" | ".join(f"{name}: {outcome[:60]}" for name, outcome in outcomes.items()), fontsize=8)
    fig.tight_layout()
    path = out_dir / "stability.png"
    fig.savefig(path, dpi=100)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, default=6e-2, help="the knob: higher overflows sooner")
    parser.add_argument("--steps", type=int, default=300)
    # small on purpose: this CPU multiplies fp16 matrices ~15x slower than fp32 (no native fp16 arithmetic)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--context", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--only", choices=list(ARMS), help="run one arm only (no plot)")
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--out-dir", type=Path, default=Path("runs/stability-demo"))
    args = parser.parse_args()
    arms = {args.only: ARMS[args.only]} if args.only else ARMS
    outcomes = {name: run_arm(arm_config(args, name, flags)) for name, flags in arms.items()}
    for name, outcome in outcomes.items():
        print(f"{name}: {outcome}")
    if not args.only:
        print(f"plot: {plot(args.out_dir, outcomes, args.width // 2)}")


if __name__ == "__main__":
    main()
