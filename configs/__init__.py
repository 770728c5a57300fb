"""Every hyperparameter of a gust run, as tyro dataclasses, plus the named presets.

`python train.py <preset> --help` lists each field with its docstring and the preset's value.
Nothing here runs anything; model.py, data.py and train.py read these values and nothing else.
"""
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Literal

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
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"--model.n-embd {self.n_embd} is not divisible by --model.n-head {self.n_head}")
        if self.vocab_multiple < 1:
            raise ValueError(f"--model.vocab-multiple {self.vocab_multiple} must be at least 1 (1 = no padding)")

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
    """Where the prepared tokens live (train.bin, val.bin, meta.json from `python data.py prepare`)."""

    dir: Path = Path("data/shakespeare")
    """Directory holding train.bin, val.bin and their meta.json sidecar."""
    verify_sha256: bool = True
    """Check each .bin against the sidecar's sha256 at start (reads the files once)."""


@dataclass
class PrepareConfig:
    """How raw text becomes train.bin / val.bin (used by `python data.py prepare`)."""

    inputs: tuple[Path, ...] = (Path(".cache/shakespeare"),)
    """Text sources: .txt files, .jsonl files with a "text" field, or directories of either."""
    out_dir: Path = Path("data/shakespeare")
    """Where train.bin, val.bin, meta.json (and a trained tokenizer.json) are written."""
    tokenizer: Literal["gpt2", "bpe"] = "gpt2"
    """gpt2: GPT-2's 50257-token BPE from vocab.json + merges.txt; bpe: a byte-level BPE trained on the train split."""
    gpt2_vocab_dir: Path = Path(".cache/gpt2")
    """Directory with GPT-2's vocab.json and merges.txt (fetched by `make setup`)."""
    bpe_vocab_size: int = 4096
    """Vocabulary size when --tokenizer bpe (includes <|endoftext|>); must be <= 65536 for uint16 storage."""
    val_fraction: float = 0.1
    """Fraction of documents held out for validation (at least one document)."""
    split_seed: int = 1337
    """Seed of the document-level train/val split."""
    batch_documents: int = 256
    """Documents per tokenizer call (the Rust tokenizer encodes a batch in parallel)."""


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
    precision: Literal["fp32", "bf16", "fp16"] = "fp16"
    """Autocast dtype for the forward pass; fp16 uses the dynamic loss scaler."""
    seed: int = 21
    """Seeds weights, data order and dropout: same seed, same run."""
    out_dir: Path | None = None
    """Run directory (config.json, metrics.jsonl, checkpoints/); default runs/<preset>."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda when available, else cpu."""
    eval_interval: int = 1000
    """Evaluate on the val split every this many steps (and at the end)."""
    eval_batches: int = 50
    """Micro-batches per periodic eval (0 = the whole val split)."""
    final_eval_batches: int = 0
    """Micro-batches for the eval at the last step (0 = the whole val split, the number to report)."""
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
    """Peak FLOP/s of one device for MFU; 0 looks the device name up in train.py's table."""
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    """Weights & Biases logging; offline writes under out_dir/wandb and syncs never."""
    wandb_project: str = "gust"
    """wandb project name."""

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
        eval_interval=1000, eval_batches=50, log_interval=10, diag_interval=100,
    )


PRESETS: dict[str, tuple[str, TrainConfig]] = {
    "shakespeare-cpu": (
        "The default main job: a small GPT-2 on the plays, about 8 minutes on 2 CPU cores.",
        TrainConfig(
            preset="shakespeare-cpu",
            model=GPTConfig(block_size=128, vocab_size=4096, n_layer=4, n_head=4, n_embd=256, dropout=0.0),
            data=DataConfig(dir=Path("data/shakespeare")),
            optim=OptimConfig(lr=2e-3, min_lr=1e-4, warmup_steps=50, decay="cosine", decay_steps=600,
                              beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, grad_clip=1.0),
            checkpoint=CheckpointConfig(schedule="every", every=300, keep_last=2),
            max_steps=600, global_batch_size=16, micro_batch_size=16, precision="fp32", seed=21,
            eval_interval=150, eval_batches=10, log_interval=25, diag_interval=100, wandb_mode="disabled",
        ),
    ),
    "gpt2-small": ("GPT-2 Small (124M), the Mistral recipe.",
                   _mistral_gpt2("gpt2-small", 6e-4, GPTConfig(n_layer=12, n_head=12, n_embd=768, dropout=0.1))),
    "gpt2-medium": ("GPT-2 Medium (355M), the Mistral recipe.",
                    _mistral_gpt2("gpt2-medium", 1.5e-4, GPTConfig(n_layer=24, n_head=16, n_embd=1024, dropout=0.1))),
}


# ----------------------------------------------------------------------------- as JSON (config.json, checkpoints)

def to_json(obj):
    """A config (nested dataclasses, Paths, tuples) as plain JSON values."""
    if is_dataclass(obj):
        return {f.name: to_json(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_json(x) for x in obj]
    return str(obj) if isinstance(obj, Path) else obj


def from_json(cls, values: dict):
    """The inverse of to_json for TrainConfig: rebuild nested dataclasses, Paths and tuples from the field types."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in fields(cls):
        if f.name not in values:
            continue
        value, hint = values[f.name], hints[f.name]
        if is_dataclass(hint):
            value = from_json(hint, value)
        elif value is not None and Path in (typing.get_args(hint) or (hint,)):
            value = Path(value)
        elif isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        kwargs[f.name] = value
    return cls(**kwargs)
