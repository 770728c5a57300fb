"""GPT-2 in one file: attention (naive / sdpa / fused cuda), MLP, block, model, loss, sampling.

Parameter names follow Hugging Face's GPT2LMHeadModel (transformer.wte, transformer.h.0.attn.c_attn, ...)
so real checkpoints load with a transpose of the Conv1D weights (see hf_bridge.py). The shape lives in
configs.GPTConfig (re-exported here). Not in here: data, training, checkpoints.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from configs import KERNEL_AT_LEAST_AS_FAST_AS_SDPA, GPTConfig
from errors import UserError

__all__ = ["GPT", "GPTConfig", "CausalSelfAttention", "naive_attention", "sdpa_attention", "cross_entropy"]

FUSED_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
"""torch's fused SDPA kernels: from fp16/bf16 inputs they accumulate QKᵀ and run the softmax in fp32."""
LAYER_NORM_EPS = 1e-5
"""GPT-2's LayerNorm ε (Hugging Face's layer_norm_epsilon)."""
INIT_STD = 0.02
"""GPT-2's initial weight std (Hugging Face's initializer_range); residual projections get INIT_STD / √(2·n_layer)."""
LOSS_CHUNK_ROWS = 2048
"""Rows of logits turned into fp32 at a time by cross_entropy: 2048 × 50304 × 4 B = 0.4 GB, not 3.3 GB."""



# ----------------------------------------------------------------------------- attention

def naive_attention(q, k, v, scale: float, upcast: bool, dropout: nn.Module | None = None,
                    return_max_score: bool = False):
    """Causal attention written out: the reference every other path is checked against.

    q, k, v: (B, nh, T, hs). Materialises the (T, T) score matrix, in fp32 when upcast. Returns y (B, nh, T, hs),
    and with return_max_score also the max |score| (after scaling, before softmax) as the path computed it.
    """
    T = q.size(-2)
    if upcast:
        # fp32 scores: under fp16 autocast QKᵀ overflows past 65504 in deep layers
        with torch.autocast(q.device.type, enabled=False):
            scores = (q.float() @ k.float().transpose(-2, -1)) * scale  # (B, nh, T, T) fp32
    else:
        scores = (q @ k.transpose(-2, -1)) * scale  # (B, nh, T, T), 16-bit under autocast: can overflow
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    max_score = scores.detach().masked_fill(~causal, 0).abs().amax().float() if return_max_score else None
    scores = scores.masked_fill(~causal, float("-inf"))
    probs = F.softmax(scores, dim=-1, dtype=torch.float32 if upcast else None)
    if dropout is not None:
        probs = dropout(probs)
    y = probs.to(v.dtype) @ v  # (B, nh, T, hs)
    return (y, max_score) if return_max_score else y


def max_attention_score(q, k, scale: float):
    """max |q·k|·scale over the causal entries, in fp32: the diagnostic for paths that never materialise scores."""
    T = q.size(-2)
    with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
        scores = (q.float() @ k.float().transpose(-2, -1)) * scale  # (B, nh, T, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        return scores.masked_fill(~causal, 0).abs().amax()


def fused_sdpa_can_run(q) -> bool:
    """Whether torch's fused SDPA kernels take these inputs as they are: 16-bit, on a GPU, a head size they
    support (a multiple of 8 up to 256: flash and memory-efficient; GPT-2's is 64). On a CPU only math runs."""
    head_size = q.size(-1)
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and head_size % 8 == 0 and head_size <= 256


def sdpa_attention(q, k, v, scale: float, upcast: bool, dropout_p: float = 0.0):
    """torch's scaled_dot_product_attention, causal, with naive_attention's scale. q, k, v: (B, nh, T, hs).

    upcast means "QKᵀ and the softmax in fp32". The fused kernels do exactly that from 16-bit inputs, so
    where one can run we keep q, k, v in 16 bits and allow only those kernels (never the math fallback,
    which would compute in 16 bits). Only where none can run (a CPU, odd head sizes) are q, k, v cast to fp32.
    """
    if upcast and fused_sdpa_can_run(q):
        with sdpa_kernel(FUSED_SDPA_BACKENDS):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale)
    if upcast and q.dtype != torch.float32:
        with torch.autocast(q.device.type, enabled=False):  # autocast would cast sdpa's inputs back to 16 bits
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), dropout_p=dropout_p,
                                               is_causal=True, scale=scale)
        return y.to(v.dtype)  # back to the activation dtype for c_proj
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale)


def kernel_is_faster_here(device: torch.device) -> bool:
    """configs' measured verdict for this card: does gust's kernel beat SDPA end to end here?"""
    if device.type != "cuda":
        return False
    name = torch.cuda.get_device_name(device)
    return any(fragment in name and faster for fragment, faster in KERNEL_AT_LEAST_AS_FAST_AS_SDPA.items())


def pick_attn_impl(requested: str, device: torch.device, dropout: float, upcast: bool) -> str:
    """Resolve "auto" to a concrete path and refuse combinations that cannot work, with one clear line."""
    import attention_cuda  # the side room: imported here so model.py works where it is absent

    if requested == "auto":  # the table first: on cards where SDPA wins, nvcc never runs
        use_cuda = kernel_is_faster_here(device) and dropout == 0.0 and upcast and attention_cuda.available()
        return "cuda" if use_cuda else "sdpa"
    if requested == "cuda":
        if not (device.type == "cuda" and attention_cuda.available()):
            raise UserError("--model.attn-impl cuda needs an NVIDIA GPU and a working nvcc build of "
                               "attention_cuda/attention.cu; use --model.attn-impl sdpa (or auto)")
        if dropout > 0.0:
            raise UserError(f"--model.attn-impl cuda has no attention dropout, but --model.dropout is {dropout}; "
                             "use --model.dropout 0 or --model.attn-impl sdpa")
        if not upcast:
            raise UserError("--model.attn-impl cuda always computes scores in fp32; "
                             "--model.no-upcast-attn needs --model.attn-impl naive or sdpa")
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
        # "auto" is sdpa until GPT.set_attn_impl(device) has looked at the card: correct everywhere, and the
        # faster path on every card measured so far
        self.attn_impl = "sdpa" if config.attn_impl == "auto" else config.attn_impl
        self.upcast = config.upcast_attn
        # one combined scale, applied in the same place by every path: 1/√hs, and 1/layer (1-based) if asked
        head_size = config.n_embd // config.n_head
        self.scale = 1.0 / math.sqrt(head_size) / ((layer_idx + 1) if config.scale_attn_by_layer_idx else 1)

    def forward(self, x, diagnose: bool = False):
        """(y, max_score): y (B, T, C); max_score the max |score| of this layer when diagnose, else None."""
        B, T, C = x.size()
        qkv = self.c_attn(x)  # (B, T, 3C)
        if self.attn_impl == "cuda":  # the kernel reads q, k, v out of qkv and writes (B, T, C): no split or copies
            y, max_score = self._fused_kernel(qkv, diagnose)
            return self.resid_dropout(self.c_proj(y)), max_score
        q, k, v = qkv.split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y, max_score = self._attend(q, k, v, diagnose)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): re-assemble the heads
        return self.resid_dropout(self.c_proj(y)), max_score

    def _fused_kernel(self, qkv, diagnose: bool):
        """gust's kernel on c_attn's output: y (B, T, C), and on diagnostic steps its max |score| by-product."""
        import attention_cuda

        if diagnose:
            y, max_score = attention_cuda.attention_qkv_with_max_score(qkv, self.n_head, self.scale)  # (B, nh)
            return y, max_score.max()
        return attention_cuda.attention_qkv(qkv, self.n_head, self.scale), None

    def _attend(self, q, k, v, diagnose: bool):
        """y (B, nh, T, hs) by the naive or sdpa path; each computes naive_attention's function (as the kernel does)."""
        if self.attn_impl == "naive":
            if diagnose:  # the max |score| of the scores this path computed (16-bit ones overflow to inf)
                return naive_attention(q, k, v, self.scale, self.upcast, self.attn_dropout, return_max_score=True)
            return naive_attention(q, k, v, self.scale, self.upcast, self.attn_dropout), None
        # sdpa never shows its scores: one extra QKᵀ, on diagnostic steps only
        max_score = max_attention_score(q, k, self.scale) if diagnose else None
        dropout_p = self.dropout if self.training else 0.0
        return sdpa_attention(q, k, v, self.scale, self.upcast, dropout_p), max_score


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
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=LAYER_NORM_EPS, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=LAYER_NORM_EPS, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, diagnose: bool = False):
        """(x, max_score): the block's output (B, T, C) and its attention's max |score| (None unless diagnose)."""
        attn_out, max_score = self.attn(self.ln_1(x), diagnose)
        x = x + attn_out  # pre-LayerNorm: the residual stream itself is never normalised
        return x + self.mlp(self.ln_2(x)), max_score


# ----------------------------------------------------------------------------- the loss

class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy over the first vocab_size columns of (N, V) logits, in fp32 one chunk of
    LOSS_CHUNK_ROWS rows at a time, forward and backward: F.cross_entropy(logits.float()) would hold an fp32
    copy of all the logits and their fp32 log-softmax through the backward. Saves the logits as they are
    (16 bits under autocast) and one log-sum-exp per row."""

    @staticmethod
    def forward(ctx, logits, targets, vocab_size: int):
        lse = torch.empty(logits.size(0), dtype=torch.float32, device=logits.device)  # (N,)
        for start in range(0, logits.size(0), LOSS_CHUNK_ROWS):
            chunk = logits[start:start + LOSS_CHUNK_ROWS, :vocab_size].float()  # (n, V) fp32, one chunk only
            lse[start:start + LOSS_CHUNK_ROWS] = torch.logsumexp(chunk, dim=-1)
        target_logits = logits.gather(1, targets[:, None]).squeeze(1).float()  # (N,)
        ctx.save_for_backward(logits, targets, lse)
        ctx.vocab_size = vocab_size
        return (lse - target_logits).mean()  # -log softmax at the target, averaged over rows

    @staticmethod
    def backward(ctx, grad_loss):
        logits, targets, lse = ctx.saved_tensors
        grad = torch.zeros_like(logits)  # columns past vocab_size (the padding) get no gradient
        for start in range(0, logits.size(0), LOSS_CHUNK_ROWS):
            rows = slice(start, start + LOSS_CHUNK_ROWS)
            probs = torch.exp(logits[rows, :ctx.vocab_size].float() - lse[rows, None])  # (n, V) softmax, fp32
            probs[torch.arange(probs.size(0), device=probs.device), targets[rows]] -= 1.0  # d loss / d logits
            grad[rows, :ctx.vocab_size] = probs * (grad_loss / logits.size(0))
        return grad, None, None


def cross_entropy(logits, targets, vocab_size: int):
    """Mean cross-entropy (fp32) of logits (B, T, V ≥ vocab_size) at targets (B, T); columns ≥ vocab_size never count."""
    return ChunkedCrossEntropy.apply(logits.flatten(0, 1), targets.flatten(), vocab_size)


# ----------------------------------------------------------------------------- the model

class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        rows = config.padded_vocab_size  # a multiple of 64: the embedding and output matmuls run faster
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(rows, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=LAYER_NORM_EPS, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, rows, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied input/output embeddings, as GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # residual projections: keep the stream's variance flat with depth
                torch.nn.init.normal_(p, mean=0.0, std=INIT_STD / math.sqrt(2 * config.n_layer))
        with torch.no_grad():
            self.transformer.wte.weight[config.vocab_size:].zero_()  # padding rows: no token reads or predicts them

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
        if isinstance(module, nn.Linear) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        """GPT-2's parameter count: tied weights once, the vocabulary's padding rows not at all."""
        padding = (self.config.padded_vocab_size - self.config.vocab_size) * self.config.n_embd
        return sum(p.numel() for p in self.parameters()) - padding

    def forward(self, idx, targets=None, diagnose: bool = False):
        """(logits, loss) for tokens idx (B, T).

        Without targets: logits (B, T, vocab_size) and loss None. With targets (B, T): logits None and the mean
        cross-entropy in fp32 (the (B, T, vocab) logits are not handed back, so they need not outlive the loss).
        diagnose=True adds a third item, this forward's per-layer diagnostics: {"act_norm": (n_layer,) mean
        residual-stream norm per token after each block, "attn_max_score": (n_layer,) max |attention score|}.
        """
        x, stats = self.hidden_states(idx, diagnose)
        logits = self.lm_head(x)  # (B, T, padded vocab)
        if targets is None:
            logits, loss = logits[..., :self.config.vocab_size], None  # padding columns: no token has those ids
        else:
            logits, loss = None, cross_entropy(logits, targets, self.config.vocab_size)
        return (logits, loss, stats) if diagnose else (logits, loss)

    def hidden_states(self, idx, diagnose: bool = False):
        """The final residual stream after ln_f (B, T, C), and the diagnostics dict (None unless diagnose)."""
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds --model.block-size {self.config.block_size}")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        act_norms, max_scores = [], []
        for block in self.transformer.h:
            x, max_score = block(x, diagnose)
            if diagnose:
                act_norms.append(x.detach().float().norm(dim=-1).mean())  # per token, averaged
                max_scores.append(max_score.float())
        stats = {"act_norm": torch.stack(act_norms), "attn_max_score": torch.stack(max_scores)} if diagnose else None
        return self.transformer.ln_f(x), stats

    def set_attn_impl(self, device: torch.device) -> str:
        """Fix the attention path for this device (resolving "auto"); returns the name taken."""
        impl = pick_attn_impl(self.config.attn_impl, device, self.config.dropout, self.config.upcast_attn)
        for block in self.transformer.h:
            block.attn.attn_impl = impl
        return impl

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """nn.Module's, after fitting the vocabulary rows to this model's padding: Hugging Face's weights and
        checkpoints from before the padding hold exactly vocab_size rows; they gain zero rows here."""
        return super().load_state_dict(fit_vocab_rows(state_dict, self.config), strict, assign)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None):
        """Append max_new_tokens sampled tokens to idx (B, T); the context is cropped to block_size."""
        for _ in range(max_new_tokens):
            x, _ = self.hidden_states(idx[:, -self.config.block_size:])  # (B, T, C)
            logits = self.lm_head(x[:, -1, :])[:, :self.config.vocab_size]  # (B, vocab): the last position only
            logits = logits.float() / max(temperature, 1e-8)
            if top_k is not None:
                kth_best = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth_best, float("-inf"))
            probs = F.softmax(logits, dim=-1)
            next_token = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, next_token), dim=1)
        return idx


def fit_vocab_rows(state: dict, config: GPTConfig) -> dict:
    """state with its wte / lm_head weights cut or zero-padded to config.padded_vocab_size rows. Only rows past
    vocab_size (padding, which no token uses) are added or dropped; any other mismatch is left for load_state_dict."""
    rows = config.padded_vocab_size
    fitted = dict(state)
    for name in ("transformer.wte.weight", "lm_head.weight"):
        weight = state.get(name)
        if weight is None or weight.dim() != 2 or weight.size(0) == rows or weight.size(0) < config.vocab_size:
            continue
        if weight.size(0) > rows:
            fitted[name] = weight[:rows]
        else:
            fitted[name] = torch.cat([weight, weight.new_zeros(rows - weight.size(0), weight.size(1))])
    return fitted
