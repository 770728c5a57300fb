"""Every hyperparameter of a gust run, as tyro dataclasses, plus the named presets.

`python train.py <preset> --help` lists each field with its docstring and the preset's value.
Nothing here runs anything; model.py, data.py and train.py read these values and nothing else.
"""
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Literal

from errors import UserError

# ----------------------------------------------------------------------------- the model

KERNEL_AT_LEAST_AS_FAST_AS_SDPA: dict[str, bool] = {"H200": False}
"""Per GPU-name fragment: does gust's kernel train GPT-2 Small at least as fast as torch's SDPA there?
Measured, not guessed (README, Performance; `python bench.py`): on one H200, torch 2.11, bf16, the kernel gave
323K tokens/s against SDPA's 408K compiled, 185K against 215K eager — so False. `--model.attn-impl auto` takes
the kernel only on cards listed True here (and where it builds); everywhere else it takes SDPA."""


@dataclass
class GPTConfig:
    """The shape of the network and how attention is computed."""

    block_size: int = 1024
    """Context length: the number of learned position embeddings."""
    vocab_size: int = 50257
    """Token vocabulary size: the tokenizer's (GPT-2 BPE: 50257). The model holds padded_vocab_size rows."""
    vocab_multiple: int = 64
    """Round the embedding and output rows up to a multiple of this (faster matmuls; 1 = no padding)."""
    n_layer: int = 12
    """Number of transformer blocks."""
    n_head: int = 12
    """Attention heads per block; must divide n_embd."""
    n_embd: int = 768
    """Width of the residual stream."""
    dropout: float = 0.0
    """Dropout on embeddings, attention probabilities and residual branches (GPT-2's single pdrop)."""
    bias: bool = True
    """Biases in Linear and LayerNorm layers (GPT-2 has them)."""
    attn_impl: Literal["auto", "naive", "sdpa", "cuda"] = "auto"
    """auto: gust's kernel where it builds and configs says it is the faster path on this card, else sdpa;
    naive: explicit math (the reference); sdpa: torch's fused op; cuda: gust's kernel."""
    upcast_attn: bool = True
    """Compute QKᵀ and softmax in fp32 even under fp16/bf16 autocast (stability fix 1)."""
    scale_attn_by_layer_idx: bool = True
    """Also divide layer i's scores by i (1-based), as HF's scale_attn_by_inverse_layer_idx (stability fix 2)."""

    def __post_init__(self):
        if self.n_head < 1:
            raise UserError(f"--model.n-head {self.n_head}: must be ≥ 1")
        if self.n_embd % self.n_head != 0:
            raise UserError(f"--model.n-embd {self.n_embd} is not divisible by --model.n-head {self.n_head}")
        if self.vocab_multiple < 1:
            raise UserError(f"--model.vocab-multiple {self.vocab_multiple} must be at least 1 (1 = no padding)")

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and output layer: vocab_size rounded up to vocab_multiple (50257 → 50304).
        The extra rows belong to no token: their logits are dropped before the loss and before sampling."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

# Mistral's checkpoint schedule: (every N steps, until step M). With step 0 this is 609 checkpoints by 400k.
MISTRAL_CHECKPOINT_INTERVALS = ((10, 100), (50, 2000), (100, 20_000), (1000, 400_000))
MISTRAL_SEEDS = (21, 49, 81, 343, 777)


@dataclass
class DataConfig:
    """Where the prepared tokens live (train and val shards plus meta.json, from `python data.py prepare`)."""

    dir: Path = Path("data/shakespeare")
    """Directory holding the train/val token files (train.bin, val.bin or shards) and their meta.json sidecar."""
    verify: Literal["size", "fingerprint", "full"] = "fingerprint"
    """Check of each token file at start (rank 0): size; fingerprint = size + ~1 MB sampled; full = whole sha256."""


GPT2_LIBRARIES = ("fastest", "gpt2_bpe", "tiktoken", "tokenizers")  # prepare's --gpt2-library: see tokenizer.py


@dataclass
class PrepareConfig:
    """How raw text becomes token shards and meta.json (used by `python data.py prepare`)."""

    inputs: tuple[Path, ...] = (Path(".cache/shakespeare"),)
    """Text sources: .txt, .jsonl, .jsonl.gz, .jsonl.zst, .parquet files, directories or globs of them."""
    out_dir: Path = Path("data/shakespeare")
    """Where the shards, meta.json (and a trained tokenizer.json) are written; a re-run resumes an interrupted one."""
    text_field: str = "text"
    """The JSON field (jsonl) or column (parquet) holding each document's text."""
    tokenizer: Literal["gpt2", "bpe"] = "gpt2"
    """gpt2: GPT-2's 50257-token BPE from vocab.json + merges.txt; bpe: a byte-level BPE trained on the train split."""
    gpt2_vocab_dir: Path = Path(".cache/gpt2")
    """Directory with GPT-2's vocab.json and merges.txt (fetched by `make setup`)."""
    gpt2_library: Literal[GPT2_LIBRARIES] = "fastest"
    """Which library encodes with GPT-2's vocabulary: all give the same ids, so the same output bytes (tested);
    fastest = gpt2_bpe (our C) where it builds, else tiktoken, else the tokenizers library."""
    bpe_vocab_size: int = 4096
    """Vocabulary size when --tokenizer bpe (includes <|endoftext|>); must be <= 65536 for uint16 storage."""
    split: Literal["permutation", "hash"] = "permutation"
    """permutation: a seeded shuffle of all documents (counts them first: one extra read); hash: per document, one pass."""
    val_fraction: float = 0.1
    """Fraction of documents held out for validation, above 0 and below 1 (permutation: at least one document)."""
    split_seed: int = 1337
    """Seed of the document-level train/val split."""
    shard_tokens: int = 100_000_000
    """Tokens per shard file (closed at the next document boundary); the unit a killed prepare resumes from. Keep
    shards to thousands, not more: each one closed rewrites prepare-state.json, which lists them all."""
    batch_documents: int = 4096
    """At most this many documents per tokenizer call (a chunk; it never spans two reader blocks, so 4 MiB of JSONL
    or 1024 Parquet rows bound it too). Changes no output byte, only the number of calls."""
    batch_bytes: int = 4 << 20
    """At most about this much text per tokenizer call (bounds memory with long documents)."""
    workers: int = 0
    """Tokenizer threads; 0 = one per core this process may use. Does not change the output."""
    progress: bool = True
    """Show a progress bar (bytes, MB/s, tokens/s, ETA) on stderr."""


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = 6e-4
    """Peak learning rate, reached at the end of warmup."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay."""
    warmup_steps: int = 4000
    """Linear warmup from 0 to lr over this many steps."""
    decay: Literal["linear", "cosine", "constant"] = "linear"
    """Shape of the decay from lr to min_lr after warmup."""
    decay_steps: int = 400_000
    """Step at which the decay reaches min_lr (Mistral: 400k, the full run)."""
    beta1: float = 0.9
    """AdamW β1."""
    beta2: float = 0.999
    """AdamW β2."""
    eps: float = 1e-8
    """AdamW ε."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to ≥2-D weights only (not biases, LayerNorm gains)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables clipping)."""
    fused: bool = False
    """Use torch's fused AdamW kernel (GPU only; same math)."""


@dataclass
class LossScaleConfig:
    """Our dynamic loss scaler for fp16 (bf16 and fp32 bypass it: scale fixed at 1, never skips)."""

    init_scale: float = 2.0**16
    """Starting loss scale."""
    growth_factor: float = 2.0
    """Multiply the scale by this after growth_interval clean steps in a row."""
    backoff_factor: float = 0.5
    """Multiply the scale by this on an overflow (once hysteresis is used up)."""
    growth_interval: int = 1000
    """Clean steps in a row before the scale grows (DeepSpeed's loss_scale_window)."""
    hysteresis: int = 2
    """Overflowing steps tolerated before backing off (1 = back off at every overflow, as torch's GradScaler)."""
    min_scale: float = 1.0
    """The scale never goes below this; an overflow at this scale aborts the run."""
    max_consecutive_skips: int = 50
    """Abort after this many skipped (overflowing) steps in a row."""


@dataclass
class CheckpointConfig:
    """When checkpoints are written and which are kept."""

    schedule: Literal["every", "mistral", "none"] = "every"
    """every: each `every` steps; mistral: Mistral's 609-checkpoint schedule (see intervals); none: only at the end."""
    every: int = 1000
    """Interval for --checkpoint.schedule every."""
    intervals: tuple[tuple[int, int], ...] = MISTRAL_CHECKPOINT_INTERVALS
    """For mistral: (every N, until step M) pairs; step 0 is always included."""
    keep_last: int = 3
    """Keep only the newest K of the non-scheduled checkpoints (preemption, end of run); 0 keeps all."""


@dataclass
class TrainConfig:
    """A whole training run."""

    model: GPTConfig = field(default_factory=GPTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss_scale: LossScaleConfig = field(default_factory=LossScaleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    preset: str = "custom"
    """Name of the preset this config started from (recorded in config.json)."""
    max_steps: int = 400_000
    """Optimizer steps to train for."""
    global_batch_size: int = 512
    """Sequences per optimizer step, summed over all ranks and micro-steps."""
    micro_batch_size: int = 8
    """Sequences per forward/backward on one rank; accumulation = global / (micro × world size)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp16"
    """Autocast dtype for the forward pass; fp16 uses the dynamic loss scaler. auto: bf16 where this device
    multiplies bf16 natively (a GPU of compute capability 8+, a CPU with avx512_bf16 or AMX), else fp32 (CPUs
    without bf16 units emulate it ~40x slower than fp32); decided when the run starts and written into its
    config.json."""
    seed: int = 21
    """Seeds weights, data order and dropout: same seed, same run."""
    out_dir: Path | None = None
    """Run directory (config.json, metrics.jsonl, checkpoints/); default runs/<preset>."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda when available, else cpu."""
    eval_interval: int = 1000
    """Evaluate on the val split every this many steps (and at the end)."""
    eval_batches: int = 50
    """Global batches of val windows per periodic eval, the first ones of the split (0 = the whole val split); the
    micro-batch size only groups their forwards."""
    final_eval_batches: int = 0
    """Global batches of val windows for the eval at the last step (0 = the whole val split, the number to report)."""
    eval_unit: Literal["global", "micro"] = "global"
    """What --eval-batches and --final-eval-batches count. micro: micro-batches, as gust did until 2026-12-07
    (a config.json written before then loads so, the run it describes); its val set moves with --micro-batch-size."""
    eval_tasks: tuple[str, ...] = ()
    """Benchmarks scored at every eval, as name:path pairs (hellaswag:hellaswag_val.jsonl lambada:lambada_test.jsonl
    wikitext:wiki.test.raw); their numbers (hellaswag_acc_norm, lambada_acc, …) join the val row of metrics.jsonl."""
    log_interval: int = 10
    """Write a metrics row and a console line every this many steps."""
    diag_interval: int = 100
    """Record per-layer activation norms and max |attention score| every this many steps (0 = never)."""
    resume: str = "none"
    """none: start fresh; auto: continue from the newest complete checkpoint in out_dir, if any; or a path."""
    init_from: Path | None = None
    """Start from the model weights of this checkpoint (or run dir's newest), e.g. hf_bridge.py import's: fine-tuning.
    Optimizer, step and RNG start fresh; ignored when --resume continues a checkpoint of this run."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms(True) and the cuBLAS workspace setting: slower, bitwise-repeatable on GPU."""
    dist: Literal["ddp", "zero1", "fsdp"] = "ddp"
    """How work is shared across ranks: ddp (replicas), zero1 (sharded optimizer state), fsdp (sharded everything)."""
    fsdp_reshard_after_forward: bool = True
    """--dist fsdp only: free each block's gathered weights after its forward (True ≈ ZeRO-3; False ≈ ZeRO-2)."""
    compile: bool = False
    """torch.compile the model."""
    tf32: bool = True
    """Allow TF32 matmuls for fp32 work on Ampere+ GPUs."""
    peak_flops: float = 0.0
    """Peak FLOP/s of one device for MFU; 0 looks the device name up in metrics.PEAK_FLOPS."""
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    """Weights & Biases logging; offline writes under out_dir/wandb and syncs never."""
    wandb_project: str = "gust"
    """wandb project name."""
    allow_config_change: bool = False
    """--resume only: continue even though a field that changes the data stream or the optimisation (seed, batch
    size, data dir, schedule, ...) differs from the checkpoint's; the change is recorded in config-changes.jsonl."""

    def run_dir(self) -> Path:
        return self.out_dir if self.out_dir is not None else Path("runs") / self.preset


def _mistral_gpt2(preset: str, lr: float, model: GPTConfig) -> TrainConfig:
    """The published Mistral recipe (GPT-2 on OpenWebText, 400k steps of 512 × 1024 tokens)."""
    return TrainConfig(
        preset=preset,
        model=model,
        data=DataConfig(dir=Path("data/openwebtext")),
        optim=OptimConfig(lr=lr, min_lr=0.0, warmup_steps=4000, decay="linear", decay_steps=400_000,
                          beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, grad_clip=1.0),
        checkpoint=CheckpointConfig(schedule="mistral", keep_last=3),
        max_steps=400_000, global_batch_size=512, micro_batch_size=8, precision="fp16", seed=21,
        eval_interval=1000, eval_batches=1, log_interval=10, diag_interval=100,  # 1 global batch: 512 windows
    )


def _shakespeare_cpu(preset: str, steps: int, eval_interval: int) -> TrainConfig:
    """The CPU demo: 4 layers × 256 on the plays' BPE-4096 tokens, precision auto (bf16 where the CPU has bf16
    units — AMX multiplies bf16 ~5× faster than fp32 — else fp32, then ~40× faster than emulated bf16), batches
    of 8 × 128 tokens (more, smaller steps learn more per second here than 16 × 128), a cosine schedule that ends
    with the run."""
    return TrainConfig(
        preset=preset,
        model=GPTConfig(block_size=128, vocab_size=4096, n_layer=4, n_head=4, n_embd=256, dropout=0.0),
        data=DataConfig(dir=Path("data/shakespeare")),
        optim=OptimConfig(lr=2e-3, min_lr=1e-4, warmup_steps=50, decay="cosine", decay_steps=steps,
                          beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, grad_clip=1.0),
        checkpoint=CheckpointConfig(schedule="every", every=steps // 2, keep_last=2),
        max_steps=steps, global_batch_size=8, micro_batch_size=8, precision="auto", seed=21,
        eval_interval=eval_interval, eval_batches=10, log_interval=25, diag_interval=100, wandb_mode="disabled",
    )


PRESETS: dict[str, tuple[str, TrainConfig]] = {
    "shakespeare-cpu": ("The default main job: a small GPT-2 on the plays, ~140 s of training on 2 CPU cores.",
                        _shakespeare_cpu("shakespeare-cpu", steps=720, eval_interval=180)),
    "shakespeare-cpu-long": ("The default demo trained twice as long for better quality (README: time and result).",
                             _shakespeare_cpu("shakespeare-cpu-long", steps=1440, eval_interval=180)),
    "shakespeare-quick": (
        "For sweeps (sweep.py): a 4-layer, 128-wide GPT-2 on the plays, about 35 s of training on 2 CPU cores.",
        TrainConfig(
            preset="shakespeare-quick",
            model=GPTConfig(block_size=64, vocab_size=4096, n_layer=4, n_head=4, n_embd=128, dropout=0.0),
            data=DataConfig(dir=Path("data/shakespeare")),
            optim=OptimConfig(lr=3e-3, min_lr=1e-4, warmup_steps=20, decay="cosine", decay_steps=200,
                              beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, grad_clip=1.0),
            # checkpoints at the end (and on SIGTERM) only: 16 MB a run; a hard-killed run starts over (~35 s)
            checkpoint=CheckpointConfig(schedule="none", keep_last=1),
            max_steps=200, global_batch_size=32, micro_batch_size=32, precision="fp32", seed=21,
            # every eval, the last too, on the same first 32k val tokens: the curves have no jump at the end
            eval_interval=50, eval_batches=16, final_eval_batches=16, log_interval=10, diag_interval=50,
            wandb_mode="disabled",
        ),
    ),
    "gpt2-small": ("GPT-2 Small (124M), the Mistral recipe.",
                   _mistral_gpt2("gpt2-small", 6e-4, GPTConfig(n_layer=12, n_head=12, n_embd=768, dropout=0.1))),
    "gpt2-medium": ("GPT-2 Medium (355M), the Mistral recipe.",
                    _mistral_gpt2("gpt2-medium", 1.5e-4, GPTConfig(n_layer=24, n_head=16, n_embd=1024, dropout=0.1))),
}


# ----------------------------------------------------------------------------- what a resume may change

FREE_ON_RESUME = ("resume", "out_dir", "init_from", "max_steps", "micro_batch_size", "device", "dist",
                  "fsdp_reshard_after_forward", "compile", "tf32", "deterministic", "peak_flops", "log_interval",
                  "diag_interval", "eval_interval", "eval_batches", "final_eval_batches", "eval_unit", "wandb_mode",
                  "wandb_project", "allow_config_change", "preset", "checkpoint", "data.verify",
                  "model.attn_impl")
"""Fields (or whole sections) a resume may change freely: they say where, how fast and how loudly the run goes,
not which tokens it sees or which update it makes (micro_batch_size with the same global batch only regroups
the sum). Every other field differing from the checkpoint's needs --allow-config-change."""


def changes_that_need_override(changes: dict) -> dict:
    """The subset of {dotted key: (old, new)} that FREE_ON_RESUME does not cover."""
    return {key: values for key, values in changes.items()
            if not any(key == free or key.startswith(free + ".") for free in FREE_ON_RESUME)}


def config_changes(saved: dict, cfg) -> dict:
    """{dotted key: (saved value, new value)} for every field of cfg that differs from the saved to_json dict.
    Keys the saved config lacks (fields added since it was written) are not compared."""
    changes = {}

    def walk(old: dict, new: dict, prefix: str):
        for key, value in new.items():
            if key not in old:
                continue
            if isinstance(value, dict) and isinstance(old[key], dict):
                walk(old[key], value, f"{prefix}{key}.")
            elif old[key] != value:
                changes[prefix + key] = (old[key], value)

    walk(saved, to_json(cfg), "")
    return changes


# ----------------------------------------------------------------------------- ranges (command line and files alike)

AT_LEAST_0, AT_LEAST_1, POSITIVE = (lambda v: v >= 0, "≥ 0"), (lambda v: v >= 1, "≥ 1"), (lambda v: v > 0, "> 0")
FRACTION = (lambda v: 0 <= v < 1, "in [0, 1)")
RANGES = {
    "seed": (lambda v: 0 <= v < 2**32, "in [0, 2**32)"),  # what numpy's seed takes
    "max_steps": AT_LEAST_0, "global_batch_size": AT_LEAST_1, "micro_batch_size": AT_LEAST_1,
    "eval_interval": AT_LEAST_1, "log_interval": AT_LEAST_1, "eval_batches": AT_LEAST_0,
    "final_eval_batches": AT_LEAST_0, "diag_interval": AT_LEAST_0, "peak_flops": AT_LEAST_0,
    "model.block_size": AT_LEAST_1, "model.vocab_size": AT_LEAST_1, "model.n_layer": AT_LEAST_1,
    "model.n_head": AT_LEAST_1, "model.n_embd": AT_LEAST_1, "model.dropout": FRACTION,
    "optim.lr": AT_LEAST_0, "optim.min_lr": AT_LEAST_0, "optim.warmup_steps": AT_LEAST_0,
    "optim.decay_steps": AT_LEAST_0, "optim.beta1": FRACTION, "optim.beta2": FRACTION, "optim.eps": POSITIVE,
    "optim.weight_decay": AT_LEAST_0, "optim.grad_clip": AT_LEAST_0,
    "loss_scale.init_scale": POSITIVE, "loss_scale.growth_factor": AT_LEAST_1,
    "loss_scale.backoff_factor": (lambda v: 0 < v <= 1, "in (0, 1]"), "loss_scale.growth_interval": AT_LEAST_1,
    "loss_scale.hysteresis": AT_LEAST_1, "loss_scale.min_scale": POSITIVE, "loss_scale.max_consecutive_skips": AT_LEAST_1,
    "checkpoint.every": AT_LEAST_1, "checkpoint.keep_last": AT_LEAST_0,
}
"""Values no run can use (a zero batch, a negative count, β ≥ 1): refused before anything is written."""


def check_ranges(cfg) -> None:
    """A one-line UserError naming the first field of cfg (a TrainConfig) whose value is out of range."""
    for key, (ok, expected) in RANGES.items():
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if isinstance(value, float) and not math.isfinite(value):  # inf would pass "≥ 0"
            raise UserError(f"{key} (--{key.replace('_', '-')}) = {value}: must be finite")
        if not ok(value):
            raise UserError(f"{key} (--{key.replace('_', '-')}) = {value}: must be {expected}")
    for interval, until in cfg.checkpoint.intervals:
        if interval < 1 or until < 0:
            raise UserError(f"checkpoint.intervals (--checkpoint.intervals) has ({interval}, {until}): each pair is "
                            "(every N ≥ 1 steps, until step M ≥ 0)")
    check_combinations(cfg)


def check_combinations(cfg) -> None:
    """A one-line UserError for values each in range that contradict each other (the schedule, the loss scale)."""
    optim, scale = cfg.optim, cfg.loss_scale
    if optim.decay != "constant" and optim.min_lr > optim.lr:  # the "decay" would raise the lr
        raise UserError(f"optim.min_lr (--optim.min-lr) = {optim.min_lr} is above optim.lr (--optim.lr) = "
                        f"{optim.lr}: the {optim.decay} decay goes from lr down to min_lr; lower --optim.min-lr "
                        "or raise --optim.lr")
    if optim.decay != "constant" and optim.warmup_steps > optim.decay_steps:  # lr would drop to min_lr at once
        raise UserError(f"optim.warmup_steps (--optim.warmup-steps) = {optim.warmup_steps} is past "
                        f"optim.decay_steps (--optim.decay-steps) = {optim.decay_steps}, where the {optim.decay} "
                        "decay ends: the lr would fall from lr to min_lr at the end of warmup")
    if scale.min_scale > scale.init_scale:  # the first backoff would raise the scale
        raise UserError(f"loss_scale.min_scale (--loss-scale.min-scale) = {scale.min_scale} is above "
                        f"loss_scale.init_scale (--loss-scale.init-scale) = {scale.init_scale}")


# ----------------------------------------------------------------------------- as JSON (config.json, checkpoints)

def to_json(obj):
    """A config (nested dataclasses, Paths, tuples) as plain JSON values."""
    if is_dataclass(obj):
        return {f.name: to_json(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_json(x) for x in obj]
    return str(obj) if isinstance(obj, Path) else obj


RENAMED = {"data.verify_sha256": ("data.verify", lambda check: "full" if check else "size")}
"""Keys older config.json files hold → (today's key, how the value translates)."""
MEANT_BEFORE = {"eval_unit": "micro"}
"""Fields added since: what a config.json without them meant (its today's default would change the run)."""


def absent_keys(values: dict, defaults: dict, prefix: str = "") -> dict:
    """{dotted key: default} for every field of defaults (a to_json dict) that the saved values lack: fields added
    since the file was written, which from_json fills with today's defaults. A renamed key counts as present."""
    renamed = {new for old, (new, _) in RENAMED.items() if old.startswith(prefix) and old[len(prefix):] in values}
    absent = {}
    for key, default in defaults.items():
        if key not in values and prefix + key not in renamed and prefix + key not in MEANT_BEFORE:
            absent[prefix + key] = default
        elif isinstance(default, dict) and isinstance(values.get(key), dict):
            absent |= absent_keys(values[key], default, f"{prefix}{key}.")
    return absent


def from_json(cls, values, where: str = "config.json", prefix: str = ""):
    """The inverse of to_json, as strict as the command line: an unknown key or a value of the wrong type is a
    one-line UserError naming the file (where), the key, the value and what was expected. Absent keys keep the
    dataclass default, as an absent flag does."""
    if not isinstance(values, dict):
        raise UserError(f"{where}: {prefix.rstrip('.') or 'the file'} = {json.dumps(values)}: expected a JSON object")
    hints, names = typing.get_type_hints(cls), [f.name for f in fields(cls)]
    for old_key, (new_key, convert) in RENAMED.items():  # config.json files of older gust versions still load
        if old_key.startswith(prefix) and old_key[len(prefix):] in values and "." not in old_key[len(prefix):]:
            values = dict(values)
            old_value = values.pop(old_key[len(prefix):])
            values.setdefault(new_key[len(prefix):], convert(old_value))
    for key, meant in MEANT_BEFORE.items():
        if key.startswith(prefix) and "." not in key[len(prefix):] and key[len(prefix):] not in values:
            values = {**values, key[len(prefix):]: meant}
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" — did you mean {prefix}{close[0]}?" if close else f" — expected one of {', '.join(names)}"
            raise UserError(f"{where}: unknown key {prefix}{key}{hint}")
    kwargs = {name: _from_value(values[name], hints[name], where, prefix + name) for name in names if name in values}
    return cls(**kwargs)


def _from_value(value, hint, where: str, key: str):
    """value (from JSON) as a value of type hint, or a UserError saying what was expected."""
    if is_dataclass(hint):
        return from_json(hint, value, where, key + ".")
    converted = _convert(value, hint)
    if converted is _WRONG:
        raise UserError(f"{where}: {key} = {json.dumps(value)}: expected {_describe(hint)}")
    return converted


_WRONG = object()  # "value does not fit the hint"; None can be a right answer


def _convert(value, hint):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return value if any(value == a and type(value) is type(a) for a in args) else _WRONG
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            converted = None if arg is type(None) and value is None else _convert(value, arg)
            if converted is not _WRONG and (converted is not None or value is None):
                return converted
        return _WRONG
    if origin is tuple:
        if not isinstance(value, list) or (args[-1] is not Ellipsis and len(value) != len(args)):
            return _WRONG
        item_hints = [args[0]] * len(value) if args[-1] is Ellipsis else args  # tuple[X, ...] or tuple[X, Y]
        items = [_convert(v, h) for v, h in zip(value, item_hints)]
        return _WRONG if any(item is _WRONG for item in items) else tuple(items)
    if hint is type(None):
        return None if value is None else _WRONG
    if hint is bool:
        return value if isinstance(value, bool) else _WRONG
    if hint is int:  # JSON's 2.5 and true are not integers
        return value if isinstance(value, int) and not isinstance(value, bool) else _WRONG
    if hint is float:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _WRONG
    if hint is str:
        return value if isinstance(value, str) else _WRONG
    if hint is Path:
        return Path(value) if isinstance(value, str) else _WRONG
    raise TypeError(f"from_json: no rule for type {hint}")  # a new field type: teach _convert and _describe


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        if args[-1] is Ellipsis:
            return f"a list, each {_describe(args[0])}"
        return "[" + ", ".join(_describe(a) for a in args) + "]"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path (a string)",
            type(None): "null"}.get(hint, str(hint))
