"""Per-GPU memory of a gust GPT-2 run under ddp, zero1 or fsdp: a planning estimate from the model's shape.

    python scripts/memory_estimate.py gpt2-small --world-size 8 --mode zero1 [--micro-batch-size 8] [--precision fp16]
    python scripts/memory_estimate.py gpt2-medium --world-size 16 --mode fsdp --no-fsdp-reshard-after-forward
    python scripts/memory_estimate.py --all          # the README's table: both GPT-2 presets, every mode, 8 GPUs

Not a measurement: nothing is allocated (the model is built on the meta device, so parameter counts are exact).
Uses argparse, not tyro, so it runs wherever torch does.

Symbols: P parameters (the tied wte/lm_head counted once), W Linear weights (lm_head included), Pb one block's
parameters, Pr the root group's (wte, wpe, ln_f: everything outside the blocks), N world size, b micro-batch,
s context, h width, a heads, L layers, V vocabulary, e bytes per activation element (2 under fp16/bf16 autocast,
4 in fp32), d = 1 if dropout > 0 else 0. Bytes per GPU at the start of backward, the peak, when every
activation is still saved. gust keeps fp32 weights and autocasts the forward, for every mode.

  parameters   ddp, zero1: 4P
               fsdp, reshard False (≈ ZeRO-2): 4P/N + 4P    (each block stays gathered from its forward to its backward)
               fsdp, reshard True  (≈ ZeRO-3): 4P/N + 4Pr + 4Pb  (the root group, needed by lm_head when backward
               starts, plus the block being computed; FSDP2's prefetch of the next block adds up to 4Pb more)
  gradients    ddp, zero1: 4P + 4P    (param.grad plus DDP's bucket copy; gradient_as_bucket_view=True drops one)
               fsdp: 4P/N + 4Pr + 4Pb (reduce-scattered after each block's backward, the root's at the end;
               assumes a reduce-scatter every micro-step — skipping it while accumulating keeps 4P unsharded)
  optimizer    AdamW's two fp32 moments. ddp: 8P. zero1: 8 × the fullest rank's parameters (ZeroRedundancyOptimizer
               hands out whole tensors, largest first, to the emptiest rank — wte alone can exceed P/N).
               fsdp: 8P/N (each tensor cut along dim 0 into N chunks, the first ones rounded up)
  16-bit copies  2W under fp16/bf16: autocast casts each Linear weight and saves the copy for backward, in every
               mode (FSDP2's MixedPrecisionPolicy instead of autocast would gather 16-bit weights block by block)
  activations  per block: s·b·h·(8 + 14e + 2d) — Korthikanti et al. (2022), "Reducing Activation Recomputation",
               without recomputation, s·b·h·(34 + 5·a·s/h) at e = 2, d = 1, except: the residual stream and the
               LayerNorm inputs stay fp32 under autocast (8, not 4), and fused attention (sdpa, cuda) recomputes
               the scores in backward, so their 5·a·s/h term is gone. The naive path saves a·s²·b·(c + d + p):
               softmax output c = 4 if upcast else e, dropout mask d, 16-bit probabilities p = e if a dropout or
               a cast made a new tensor (7 at fp16 with upcast and dropout; Korthikanti's 5 without upcast);
               upcast also keeps q, k in fp32 (+2·(4 - e)·s·b·h).
               outside the blocks: s·b·h·(d + 4 + e) (embedding dropout mask, ln_f input, lm_head input)
               logits: s·b·V·2e + 8·r·V, V padded (model.GPTConfig.padded_vocab_size): the logits, which
               model.cross_entropy saves as they are (e bytes; it makes fp32 copies one chunk of r = min(s·b,
               model.LOSS_CHUNK_ROWS) rows at a time), then in its backward their gradient (e) and one chunk's two
               fp32 temporaries: b·s·V·e is what the forward leaves; the rest lasts only through the loss's
               backward, but that runs first, while every other activation is still saved.
Not counted: the CUDA context and NCCL buffers (~0.5–1.5 GiB), allocator fragmentation, terms O(1/h) smaller
(LayerNorm statistics, fused attention's log-sum-exp), and AdamW's foreach temporaries (≈ 4 bytes × the largest
param group, at the optimizer step, when the activations are already freed).
"""
import argparse
import math
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: find configs, model
from configs import PRESETS, TrainConfig  # noqa: E402
from model import GPT, LOSS_CHUNK_ROWS, GPTConfig  # noqa: E402

GIB = 2**30
TABLE_PRESETS = ("gpt2-small", "gpt2-medium")
TABLE_MODES = (("ddp", False), ("zero1", False), ("fsdp", False), ("fsdp", True))  # (mode, reshard after forward)


# ----------------------------------------------------------------------------- counting the model

def meta_model(model_cfg: GPTConfig) -> GPT:
    with torch.device("meta"):  # shapes without storage: gpt2-medium costs no memory
        return GPT(model_cfg)


def zero1_largest_rank(model: GPT, world_size: int) -> int:
    """Parameters held by ZeroRedundancyOptimizer's fullest rank, partitioned as torch does it."""
    sizes = [0] * world_size
    params = list(model.parameters())
    groups = ([p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2])  # train.build_optimizer's
    for group in groups:
        for p in sorted(group, key=lambda p: p.numel(), reverse=True):  # largest first, to the emptiest rank
            sizes[sizes.index(min(sizes))] += p.numel()
    return max(sizes)


def fsdp_largest_shard(model: GPT, world_size: int) -> int:
    """Parameters on FSDP2's fullest rank: every tensor cut along dim 0, rank 0 getting ceil(rows / N)."""
    return sum(math.ceil(p.shape[0] / world_size) * (p.numel() // p.shape[0]) for p in model.parameters())


def model_counts(model_cfg: GPTConfig, world_size: int) -> dict[str, int]:
    model = meta_model(model_cfg)
    params = model.num_params()
    block = sum(p.numel() for p in model.transformer.h[0].parameters())
    return {"P": params, "Pb": block, "Pr": params - model_cfg.n_layer * block,
            "W": sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)),
            "zero1_rank": zero1_largest_rank(model, world_size), "fsdp_shard": fsdp_largest_shard(model, world_size)}


# ----------------------------------------------------------------------------- the estimate

def activation_bytes(m: GPTConfig, micro_batch: int, precision: str) -> dict[str, int]:
    """Bytes saved for backward when it starts, by part (formulas in the module docstring)."""
    s, b, h, a, V = m.block_size, micro_batch, m.n_embd, m.n_head, m.padded_vocab_size
    e = 4 if precision == "fp32" else 2
    d = 1 if m.dropout > 0 else 0
    per_block = s * b * h * (8 + 14 * e + 2 * d)
    if m.attn_impl == "naive":  # the only path that stores the (s, s) scores
        softmax_out = 4 if m.upcast_attn else e
        probs_copy = e if (d or softmax_out != e) else 0  # dropout output, or the fp32 → 16-bit cast for P·V
        per_block += a * s * s * b * (softmax_out + d + probs_copy)
        per_block += 2 * (4 - e) * s * b * h if m.upcast_attn else 0  # q, k kept in fp32 for QKᵀ's backward
    elif m.attn_impl == "sdpa" and m.upcast_attn and e == 2:  # fp32 q, k, v and output replace the 16-bit q, k, v
        per_block += 10 * s * b * h
    return {"blocks": m.n_layer * per_block, "embeddings, ln_f, lm_head input": s * b * h * (d + 4 + e),
            "logits, saved by the loss": e * s * b * V,
            "logits held, cross-entropy gradients": e * s * b * V + 8 * min(s * b, LOSS_CHUNK_ROWS) * V}


def estimate(cfg: TrainConfig, counts: dict[str, int], world_size: int, mode: str, reshard: bool) -> dict[str, int]:
    """Bytes per GPU, by row: parameters, gradients, optimizer, 16-bit copies, activations, total."""
    n = counts  # the docstring's symbols: n["P"], n["Pb"], n["Pr"], n["W"]
    if mode in ("ddp", "zero1"):
        params = 4 * n["P"]
        grads = 4 * n["P"] * (2 if world_size > 1 else 1)  # DDP (world size > 1 only) adds its bucket copy
        optimizer = 8 * (n["P"] if mode == "ddp" else n["zero1_rank"])
    else:
        gathered = n["Pr"] + n["Pb"] if reshard else n["P"]
        params = 4 * n["fsdp_shard"] + 4 * gathered
        grads = 4 * n["fsdp_shard"] + 4 * (n["Pr"] + n["Pb"])
        optimizer = 8 * n["fsdp_shard"]
    rows = {"parameters": params, "gradients": grads, "optimizer": optimizer,
            "16-bit copies": 0 if cfg.precision == "fp32" else 2 * n["W"],
            "activations": sum(activation_bytes(cfg.model, cfg.micro_batch_size, cfg.precision).values())}
    return {**rows, "total": sum(rows.values())}


def formulas(mode: str, reshard: bool, world_size: int, precision: str) -> dict[str, str]:
    """The row formulas of the module docstring, for the printout."""
    fsdp = mode == "fsdp"
    params = ("4P/N + 4Pr + 4Pb" if reshard else "4P/N + 4P") if fsdp else "4P"
    grads = "4P/N + 4Pr + 4Pb" if fsdp else ("4P + 4P DDP buckets" if world_size > 1 else "4P")
    optimizer = {"ddp": "8P", "zero1": "8 × fullest rank's params", "fsdp": "8P/N"}[mode]
    return {"parameters": params, "gradients": grads, "optimizer": optimizer, "16-bit copies": "0 (no autocast)" if precision == "fp32" else "2W",
            "activations": "L·s·b·h·(8 + 14e + 2d) [+ naive scores] + s·b·h·(d + 4 + e) + s·b·V·2e + 8·r·V",
            "total": ""}


# ----------------------------------------------------------------------------- printing

def mode_label(mode: str, reshard: bool) -> str:
    return f"fsdp, reshard {reshard}" if mode == "fsdp" else mode


def print_report(preset: str, cfg: TrainConfig, world_size: int, mode: str, reshard: bool):
    m, n = cfg.model, model_counts(cfg.model, world_size)
    print(f"{preset} on {world_size} GPUs, {mode_label(mode, reshard)}: micro-batch {cfg.micro_batch_size} × "
          f"{m.block_size} tokens, {cfg.precision}, attention {m.attn_impl}, dropout {m.dropout}")
    print(f"P = {n['P']:,}  W = {n['W']:,}  Pb = {n['Pb']:,}  Pr = {n['Pr']:,}  "
          f"zero1's fullest rank = {n['zero1_rank']:,}  fsdp shard = {n['fsdp_shard']:,}")
    rows, how = estimate(cfg, n, world_size, mode, reshard), formulas(mode, reshard, world_size, cfg.precision)
    parts = activation_bytes(m, cfg.micro_batch_size, cfg.precision)
    for name, value in rows.items():
        print(f"  {name:<14} {value / GIB:8.3f} GiB   {how[name]}".rstrip())
        if name == "activations":
            for part, part_value in parts.items():
                print(f"    {part_value / GIB:21.3f} GiB   {part}")
    print("Per GPU at the start of backward; formulas and what is left out: "
          "scripts/memory_estimate.py's docstring (--help).")


def print_table(world_size: int):
    """A markdown table of every mode for the GPT-2 presets, at their own micro-batch and precision."""
    print(f"| preset | --dist | parameters | gradients | optimizer | 16-bit copies | activations | "
          f"total (GiB per GPU, {world_size} GPUs) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for preset in TABLE_PRESETS:
        cfg = PRESETS[preset][1]
        counts = model_counts(cfg.model, world_size)
        for mode, reshard in TABLE_MODES:
            rows = estimate(cfg, counts, world_size, mode, reshard)
            cells = " | ".join(f"{rows[name] / GIB:.2f}" for name in rows)
            print(f"| {preset} | {mode_label(mode, reshard)} | {cells} |")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", nargs="?", choices=sorted(PRESETS), help="shape, micro-batch and precision from here")
    parser.add_argument("--world-size", type=int, default=8, help="GPUs in total (nodes × GPUs per node)")
    parser.add_argument("--mode", choices=("ddp", "zero1", "fsdp"), default="ddp", help="as train.py's --dist")
    parser.add_argument("--fsdp-reshard-after-forward", action=argparse.BooleanOptionalAction, default=True,
                        help="fsdp only: True ≈ ZeRO-3, False ≈ ZeRO-2")
    parser.add_argument("--micro-batch-size", type=int, help="sequences per forward on one GPU (default: the preset's)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="default: the preset's")
    parser.add_argument("--attn-impl", choices=("auto", "naive", "sdpa", "cuda"), help="default: the preset's")
    parser.add_argument("--all", action="store_true", help="print the README's markdown table instead")
    args = parser.parse_args(argv)
    if args.preset is None and not args.all:
        parser.error("name a preset (e.g. gpt2-small) or pass --all")
    if args.world_size < 1:
        parser.error(f"--world-size {args.world_size}: needs at least 1 GPU")
    if args.micro_batch_size is not None and args.micro_batch_size < 1:
        parser.error(f"--micro-batch-size {args.micro_batch_size}: needs at least 1 sequence")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.all:
        print_table(args.world_size)
        return
    cfg = PRESETS[args.preset][1]
    model = replace(cfg.model, attn_impl=args.attn_impl or cfg.model.attn_impl)
    cfg = replace(cfg, model=model, micro_batch_size=args.micro_batch_size or cfg.micro_batch_size,
                  precision=args.precision or cfg.precision)
    print_report(args.preset, cfg, args.world_size, args.mode, args.fsdp_reshard_after_forward)


if __name__ == "__main__":
    main()
