"""GPT-2 in one file: config, attention (naive / sdpa / fused cuda), MLP, block, model, sampling.

Parameter names follow Hugging Face's GPT2LMHeadModel (transformer.wte, transformer.h.0.attn.c_attn, ...)
so real checkpoints load with a transpose of the Conv1D weights (see hf_bridge.py). Not in here:
data, training, checkpoints.
"""
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from errors import UserError


@dataclass
class GPTConfig:
    """The shape of the network and how attention is computed."""

    block_size: int = 1024
    """Context length: the number of learned position embeddings."""
    vocab_size: int = 50257
    """Token vocabulary size (GPT-2 BPE: 50257)."""
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
    attn_impl: Literal["auto", "naive", "sdpa", "cuda"] = "sdpa"
    """naive: explicit math (the reference); sdpa: torch's fused op; cuda: gust's kernel; auto: cuda, else sdpa."""
    upcast_attn: bool = True
    """Compute QKᵀ and softmax in fp32 even under fp16/bf16 autocast (stability fix 1)."""
    scale_attn_by_layer_idx: bool = True
    """Also divide layer i's scores by i (1-based), as HF's scale_attn_by_inverse_layer_idx (stability fix 2)."""

    def __post_init__(self):
        if self.n_head < 1:
            raise UserError(f"--model.n-head {self.n_head}: must be ≥ 1")
        if self.n_embd % self.n_head != 0:
            raise UserError(f"--model.n-embd {self.n_embd} is not divisible by --model.n-head {self.n_head}")


def naive_attention(q, k, v, scale: float, upcast: bool, dropout: nn.Module | None = None, stats: dict | None = None):
    """Causal attention written out: the reference every other path is checked against.

    q, k, v: (B, nh, T, hs). Materialises the (T, T) score matrix, in fp32 when upcast.
    If `stats` is given, stores the max |score| (after scaling, before softmax) under "max_score".
    """
    T = q.size(-2)
    if upcast:
        # fp32 scores: under fp16 autocast QKᵀ overflows past 65504 in deep layers
        with torch.autocast(q.device.type, enabled=False):
            scores = (q.float() @ k.float().transpose(-2, -1)) * scale  # (B, nh, T, T) fp32
    else:
        scores = (q @ k.transpose(-2, -1)) * scale  # (B, nh, T, T), 16-bit under autocast: can overflow
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    if stats is not None:
        stats["max_score"] = scores.detach().masked_fill(~causal, 0).abs().amax().float()
    scores = scores.masked_fill(~causal, float("-inf"))
    probs = F.softmax(scores, dim=-1, dtype=torch.float32 if upcast else None)
    if dropout is not None:
        probs = dropout(probs)
    return probs.to(v.dtype) @ v  # (B, nh, T, hs)


def max_attention_score(q, k, scale: float):
    """max |q·k|·scale over the causal entries, in fp32: the diagnostic for paths that never materialise scores."""
    T = q.size(-2)
    with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
        scores = (q.float() @ k.float().transpose(-2, -1)) * scale  # (B, nh, T, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        return scores.masked_fill(~causal, 0).abs().amax()


def pick_attn_impl(requested: str, device: torch.device, dropout: float, upcast: bool) -> str:
    """Resolve "auto" to a concrete path and refuse combinations that cannot work, with one clear line."""
    import attention_cuda  # the side room: imported here so model.py works where it is absent

    if requested == "auto":
        use_cuda = device.type == "cuda" and dropout == 0.0 and upcast and attention_cuda.available()
        return "cuda" if use_cuda else "sdpa"
    if requested == "cuda":
        if not (device.type == "cuda" and attention_cuda.available()):
            raise RuntimeError("--model.attn-impl cuda needs an NVIDIA GPU and a working nvcc build of "
                               "attention_cuda/attention.cu; use --model.attn-impl sdpa (or auto)")
        if dropout > 0.0:
            raise ValueError(f"--model.attn-impl cuda has no attention dropout, but --model.dropout is {dropout}; "
                             "use --model.dropout 0 or --model.attn-impl sdpa")
        if not upcast:
            raise ValueError("--model.attn-impl cuda always computes scores in fp32; "
                             "--model.upcast-attn False needs --model.attn-impl naive or sdpa")
    return requested


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v for all heads
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout
        self.attn_impl = config.attn_impl
        self.upcast = config.upcast_attn
        # one combined scale, applied in the same place by every path: 1/√hs, and 1/layer (1-based) if asked
        head_size = config.n_embd // config.n_head
        self.scale = 1.0 / math.sqrt(head_size) / ((layer_idx + 1) if config.scale_attn_by_layer_idx else 1)
        self.stats = None  # a dict while diagnostics are being recorded (see GPT.record_stats)

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if self.attn_impl == "auto":  # decided once, on the first forward (GPT.set_attn_impl decides up front)
            self.attn_impl = pick_attn_impl("auto", x.device, self.dropout, self.upcast)
        impl = self.attn_impl
        if impl == "naive":
            y = naive_attention(q, k, v, self.scale, self.upcast, self.attn_dropout, self.stats)
        else:
            y = self._fused(impl, q, k, v)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): re-assemble the heads
        return self.resid_dropout(self.c_proj(y))

    def _fused(self, impl, q, k, v):
        """sdpa or our cuda kernel; both take the combined scale so they compute naive_attention's function."""
        if impl == "cuda":
            import attention_cuda

            if self.stats is not None:  # the kernel's by-product: no second pass over the scores
                y, max_score = attention_cuda.attention_with_max_score(q, k, v, self.scale)  # max_score (B, nh)
                self.stats["max_score"] = max_score.max()
                return y
            return attention_cuda.attention(q, k, v, self.scale)
        if self.stats is not None:  # sdpa never shows its scores: one extra QKᵀ, on diagnostic steps only
            self.stats["max_score"] = max_attention_score(q, k, self.scale)
        dropout_p = self.dropout if self.training else 0.0
        if self.upcast:  # fp32 in, fp32 softmax; back to the activation dtype for c_proj
            with torch.autocast(q.device.type, enabled=False):  # autocast would cast sdpa's inputs back to 16 bits
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), dropout_p=dropout_p,
                                                   is_causal=True, scale=self.scale)
            return y.to(v.dtype)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=self.scale)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))  # GPT-2's "gelu_new"


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))  # pre-LayerNorm: the residual stream itself is never normalised
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied input/output embeddings, as GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # residual projections: keep the stream's variance flat with depth
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        self.act_norms = None  # a list while diagnostics are being recorded

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once

    def forward(self, idx, targets=None):
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds --model.block-size {self.config.block_size}")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
            if self.act_norms is not None:  # mean L2 norm of the residual stream per token, after this block
                self.act_norms.append(x.detach().float().norm(dim=-1).mean())
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))  # fp32 loss
        return logits, loss

    def record_stats(self, enabled: bool):
        """Turn on the per-layer diagnostics for the next forward: residual norms and max |attention score|."""
        self.act_norms = [] if enabled else None
        for block in self.transformer.h:
            block.attn.stats = {} if enabled else None

    def collect_stats(self) -> dict:
        """Per-layer diagnostics recorded by the last forward, as Python floats; then recording stops."""
        stats = {
            "act_norm": [float(n) for n in self.act_norms or []],
            "attn_max_score": [float(b.attn.stats.get("max_score", float("nan")))
                               for b in self.transformer.h if b.attn.stats is not None],
        }
        self.record_stats(False)
        return stats

    def set_attn_impl(self, device: torch.device) -> str:
        """Fix the attention path for this device (resolving "auto"); returns the name taken."""
        impl = pick_attn_impl(self.config.attn_impl, device, self.config.dropout, self.config.upcast_attn)
        for block in self.transformer.h:
            block.attn.attn_impl = impl
        return impl

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None):
        """Append max_new_tokens sampled tokens to idx (B, T); the context is cropped to block_size."""
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size:]
            logits, _ = self(context)
            logits = logits[:, -1, :].float() / max(temperature, 1e-8)  # (B, vocab)
            if top_k is not None:
                kth_best = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth_best, float("-inf"))
            probs = F.softmax(logits, dim=-1)
            next_token = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, next_token), dim=1)
        return idx
