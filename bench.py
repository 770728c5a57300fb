"""End-to-end training throughput on one GPU: GPT-2 Small through train.py's own loop, per attention path.

    python bench.py --out DIR                 # on a GPU machine (no tyro or wandb needed)
    python bench.py --out DIR --tiny --device cpu --steps 4   # a dry run of this script on a CPU

For each configuration it runs train.train() for --steps steps on GPT-2 tokens of the plays, then reads
tokens/s, MFU and peak memory from the run's own metrics.jsonl (the median over logged intervals after
the first, which holds start-up and compilation). Prints the table last; writes DIR/bench.txt and .json.
Not for: kernel-level timings (attention_cuda/gpu_check.py) or CPU tuning.
"""
import argparse
import json
import shutil
import statistics
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

from configs import PRESETS, CheckpointConfig, DataConfig, PrepareConfig
from data import prepare
from errors import metrics_rows

ROOT = Path(__file__).resolve().parent
# The matrix of issue 7, most important first. Dropout is 0 throughout, so every path computes the same
# function (the fused kernel has no attention dropout). sdpa with upcast keeps 16-bit q, k, v where a fused
# kernel runs (model.sdpa_attention), so upcast on and off should now time the same; the rows show it.
CONFIGS = [
    dict(attn="cuda", precision="bf16"), dict(attn="sdpa", precision="bf16", upcast=False),
    dict(attn="cuda", precision="fp16"), dict(attn="sdpa", precision="fp16", upcast=False),
    dict(attn="cuda", precision="bf16", compile=True), dict(attn="sdpa", precision="bf16", upcast=False, compile=True),
    dict(attn="cuda", precision="fp16", preset="gpt2-medium"),
    dict(attn="sdpa", precision="bf16"), dict(attn="naive", precision="bf16"), dict(attn="naive", precision="fp16"),
    dict(attn="sdpa", precision="bf16", compile=True), dict(attn="naive", precision="bf16", compile=True),
]
# Issue 13 part 4: the new default (auto, upcast on, vocabulary padded to 50304) against the best SDPA setting,
# compiled and not, bf16 and fp16; the padding on/off; micro-batch choices for the presets (an H200 has 141 GB).
PART4 = [
    dict(attn="auto", precision="bf16", compile=True), dict(attn="sdpa", precision="bf16", upcast=False, compile=True),
    dict(attn="auto", precision="bf16"), dict(attn="auto", precision="fp16"), dict(attn="auto", precision="fp16", compile=True),
    dict(attn="auto", precision="bf16", compile=True, vocab_multiple=1),  # the padding off: 50257 rows
    dict(attn="auto", precision="bf16", vocab_multiple=1),
    *(dict(attn="auto", precision="bf16", compile=True, micro_batch_size=m) for m in (8, 32, 64)),
    dict(attn="cuda", precision="bf16", compile=True),
]
# what --deterministic costs (run in a fresh process with CUBLAS_WORKSPACE_CONFIG=:4096:8 set from the start)
# (deterministic runs twice: their final losses should agree to the bit)
DETERMINISTIC = [dict(attn=attn, precision="bf16", upcast=attn != "sdpa", deterministic=flag)
                 for attn in ("sdpa", "cuda") for flag in (False, True, True)]


def gpt2_tokens(work: Path) -> Path:
    """The plays in GPT-2's vocabulary (the bench needs 50257 tokens, not the CPU demo's 4096)."""
    out = work / "data-gpt2"
    if not (out / "meta.json").is_file():
        prepare(PrepareConfig(inputs=(ROOT / ".cache" / "shakespeare",), out_dir=out, tokenizer="gpt2",
                              gpt2_vocab_dir=ROOT / ".cache" / "gpt2"))
    return out


def bench_config(data_dir: Path, run_dir: Path, args, attn: str, precision: str, compile: bool = False,
                 upcast: bool = True, preset: str = "gpt2-small", deterministic: bool = False, vocab_multiple: int = 64,
                 micro_batch_size: int | None = None) -> dict:
    """One short run of the real training loop; its numbers come from its own metrics.jsonl."""
    from train import train

    cfg = PRESETS[preset][1]
    micro_batch_size = micro_batch_size or args.micro_batch_size
    model = replace(cfg.model, attn_impl=attn, upcast_attn=upcast, dropout=0.0, vocab_multiple=vocab_multiple)
    if args.tiny:
        model = replace(model, n_layer=2, n_head=2, n_embd=128, block_size=256)
    cfg = replace(cfg, model=model, data=DataConfig(dir=data_dir, verify="size"), precision=precision,
                  compile=compile, max_steps=args.steps, global_batch_size=micro_batch_size,
                  micro_batch_size=micro_batch_size, out_dir=run_dir, device=args.device,
                  log_interval=args.log_interval, eval_interval=10**9, eval_batches=1, final_eval_batches=0, diag_interval=0,
                  checkpoint=CheckpointConfig(schedule="none", keep_last=1), wandb_mode="disabled",
                  optim=replace(cfg.optim, fused=True), tf32=True, deterministic=deterministic)
    shutil.rmtree(run_dir, ignore_errors=True)
    started = time.perf_counter()
    try:
        result = train(cfg)
    finally:
        torch.use_deterministic_algorithms(False)  # a process-wide switch: don't leak it into the next config
    rows = metrics_rows(run_dir / "metrics.jsonl")
    steady = [row for row in rows if "tokens_per_sec" in row][1:]  # the first interval holds start-up
    shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints of a benchmark are not worth the disk
    median = lambda key: statistics.median(row[key] for row in steady) if steady and steady[0][key] is not None else None
    return {"preset": preset, "attn_impl": attn if attn != "sdpa" or upcast else "sdpa-16", "precision": precision,
            "compile": compile, "deterministic": deterministic, "vocab_rows": model.padded_vocab_size,
            "micro_batch_size": micro_batch_size,
            "tokens_per_sec": median("tokens_per_sec"), "mfu": median("mfu"),
            "peak_memory_gb": max((row["peak_memory_gb"] or 0) for row in steady) if steady else None,
            "skipped_steps": steady[-1]["skipped_steps"] if steady else None, "final_loss": steady[-1]["loss"] if steady else None,
            "val_loss": result["val_loss"], "wall_s": time.perf_counter() - started}


def table(rows: list[dict]) -> str:
    lines = [f"{'preset':<12} {'attention':<8} {'prec':<5} {'compile':<7} {'determ.':<7} {'vocab':>6} {'micro':>5} "
             f"{'tokens/s':>10} {'MFU':>6} {'peak GB':>8} {'skipped':>7} {'loss':>7} {'wall s':>7}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['preset']:<12} {r['attn_impl']:<8} {r['precision']:<5} {str(r['compile']):<7} FAILED: {r['error']}")
            continue
        shown = lambda key, spec, scale=1, unit="": "-" if r[key] is None else format(scale * r[key], spec) + unit  # noqa: E731
        lines.append(f"{r['preset']:<12} {r['attn_impl']:<8} {r['precision']:<5} {str(r['compile']):<7} "
                     f"{str(r.get('deterministic', False)):<7} {r['vocab_rows']:>6} {r['micro_batch_size']:>5} "
                     f"{shown('tokens_per_sec', ',.0f'):>10} {shown('mfu', '.1f', 100, '%'):>6} "
                     f"{shown('peak_memory_gb', '.1f'):>8} {shown('skipped_steps', 'd'):>7} "
                     f"{shown('final_loss', '.3f'):>7} {r['wall_s']:>7.1f}")  # "-": too few steps for a steady rate
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=30, help="training steps per configuration")
    parser.add_argument("--micro-batch-size", type=int, default=16, help="sequences of 1024 tokens per step")
    parser.add_argument("--log-interval", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model: dry runs of this script")
    parser.add_argument("--only", default="", help="comma-separated attention paths to run (default: all)")
    parser.add_argument("--set", choices=("issue7", "part4", "deterministic"), default="issue7",
                        help="issue7: the attention/precision/compile matrix; part4: issue 13's default, padding and "
                             "micro-batch rows; deterministic: --deterministic on vs off")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "work"
    data_dir = gpt2_tokens(work)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    header = f"bench: {device} | torch {torch.__version__} | {args.steps} steps × {args.micro_batch_size} × 1024 tokens"
    print(header, flush=True)
    rows = []
    matrix = {"issue7": CONFIGS, "part4": PART4, "deterministic": DETERMINISTIC}[args.set]
    for config in [c for c in matrix if not args.only or c["attn"] in args.only.split(",")]:
        try:
            rows.append(bench_config(data_dir, work / "run", args, **config))
        except Exception as err:  # one failing path must not hide the others
            traceback.print_exc()
            rows.append({"preset": config.get("preset", "gpt2-small"), "attn_impl": config["attn"],
                         "precision": config["precision"], "compile": config.get("compile", False),
                         "error": f"{type(err).__name__}: {str(err)[:200]}"})
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        (args.out / "bench.json").write_text(json.dumps(rows, indent=1))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    shutil.rmtree(work, ignore_errors=True)
    report = header + "\n" + table(rows)
    (args.out / "bench.txt").write_text(report + "\n")
    print("\n" + report, flush=True)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
