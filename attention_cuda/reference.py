"""The twin of attention.cu: the same tiled, online-softmax causal attention in plain PyTorch.

Read it beside attention.cu: the loops, tile names and block sizes are the kernel's, so each
block of CUDA has a few lines here that say what it computes. It runs anywhere (CPU, any float
dtype) and is slow; it is a specification and a test oracle, not a fast path.

Numerics follow the kernel's "upcast" rule: 16-bit inputs are multiplied with fp32 results,
scale and softmax happen in fp32, and P and dS are rounded to the input dtype right where the
kernel feeds them to the tensor cores. fp64 inputs stay fp64 throughout.

It also holds the folder's one textbook oracle (causal_scores, causal_attention, max_abs_score):
the (T, T) formula that __init__.py's CPU path and gpu_check.py compare against. The tests keep
their own copy on purpose: a test must not trust the code it checks.
"""

import math

import torch

BLOCK_Q = 64  # query rows per tile: one CUDA block owns one Q tile (4 warps x 16 rows)
BLOCK_K = 64  # key rows per tile: the K/V tiles streamed through shared memory


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for 16-bit inputs (the kernel's accumulators), the input dtype when it is wider."""
    return torch.promote_types(dtype, torch.float32)


def _causal_mask(q_start: int, q_end: int, k_start: int, k_end: int, device) -> torch.Tensor:
    """True where query i may not see key j (j > i); the kernel's is_masked()."""
    rows = torch.arange(q_start, q_end, device=device)  # query positions i
    cols = torch.arange(k_start, k_end, device=device)  # key positions j
    return cols[None, :] > rows[:, None]  # (bq, bk)


def causal_scores(q, k, scale: float) -> torch.Tensor:
    """scale * q kᵀ with the future (j > i) set to -inf, in q's dtype: (B, H, T, T).

    The textbook formula every tiled result here is checked against; upcast q, k first
    (e.g. .double()) to get exact-math scores.
    """
    T = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, T)
    return scores.masked_fill(_causal_mask(0, T, 0, T, q.device), -math.inf)


def causal_attention(q, k, v, scale: float):
    """softmax(causal_scores) v, in the inputs' dtype: (y (B, H, T, D), lse (B, H, T))."""
    scores = causal_scores(q, k, scale)
    return torch.softmax(scores, dim=-1) @ v, torch.logsumexp(scores, dim=-1)


def max_abs_score(q, k, scale: float) -> torch.Tensor:
    """(B, H) max |scale * q·k| over the causal entries (j <= i), in fp32 or wider.

    The overflow diagnostic every attention path reports: it is large when scores near fp16's
    65,504 either way, which the signed row max misses when the largest scores are negative.
    """
    acc = _accumulator_dtype(q.dtype)
    with torch.no_grad():
        scores = causal_scores(q.to(acc), k.to(acc), scale)  # (B, H, T, T), -inf in the future
        return scores.masked_fill(scores == -math.inf, 0.0).abs().amax(dim=(-2, -1))


def flash_forward(q, k, v, scale: float, block_q: int = BLOCK_Q, block_k: int = BLOCK_K):
    """Causal attention, one Q tile at a time, streaming K/V tiles. Returns (o, lse).

    q, k, v: (B, H, T, D). o: (B, H, T, D) in q's dtype. lse: (B, H, T) per-row
    log-sum-exp of the scaled, masked scores, in the accumulator dtype; the backward needs it.
    """
    B, H, T, D = q.shape
    acc = _accumulator_dtype(q.dtype)
    o = torch.empty_like(q)
    lse = torch.empty(B, H, T, dtype=acc, device=q.device)
    for q_start in range(0, T, block_q):  # kernel: one CUDA block per Q tile
        q_end = min(q_start + block_q, T)
        q_tile = q[:, :, q_start:q_end].to(acc)  # (B, H, bq, D)
        row_max = torch.full((B, H, q_end - q_start), -math.inf, dtype=acc, device=q.device)
        row_sum = torch.zeros_like(row_max)  # (B, H, bq) running sum of exp(score - row_max)
        o_acc = torch.zeros_like(q_tile)  # (B, H, bq, D) unnormalised output, fp32
        # causal: K tiles that start past the tile's last query are fully masked, so skipped
        for k_start in range(0, q_end, block_k):
            k_end = min(k_start + block_k, T)
            k_tile = k[:, :, k_start:k_end].to(acc)  # (B, H, bk, D)
            v_tile = v[:, :, k_start:k_end]  # (B, H, bk, D) kept 16-bit: tensor-core operand
            scores = (q_tile @ k_tile.transpose(-2, -1)) * scale  # (B, H, bq, bk) fp32, then scale
            scores = scores.masked_fill(_causal_mask(q_start, q_end, k_start, k_end, q.device), -math.inf)
            new_max = torch.maximum(row_max, scores.amax(dim=-1))  # (B, H, bq)
            # guard: a row with nothing visible yet has max -inf, and -inf - -inf is NaN
            safe_max = torch.where(new_max == -math.inf, torch.zeros_like(new_max), new_max)
            p = torch.exp(scores - safe_max[..., None])  # (B, H, bq, bk) masked entries -> 0
            alpha = torch.exp(row_max - safe_max)  # (B, H, bq) rescales what was summed so far
            row_sum = alpha * row_sum + p.sum(dim=-1)  # sums the fp32 p, as the kernel does
            p_tile = p.to(q.dtype).to(acc)  # the kernel feeds P to the tensor cores in 16-bit
            o_acc = alpha[..., None] * o_acc + p_tile @ v_tile.to(acc)  # (B, H, bq, D)
            row_max = new_max
        o[:, :, q_start:q_end] = (o_acc / row_sum[..., None]).to(q.dtype)
        lse[:, :, q_start:q_end] = row_max + torch.log(row_sum)
    return o, lse


def _recompute_tile(q, k, v, do, lse, delta, q_start, q_end, k_start, k_end, scale):
    """P and dS for one (Q tile, K tile) pair, rebuilt from q, k and the saved lse.

    Returns (q_tile, k_tile, do_tile, p, ds); p and ds are (B, H, bq, bk) in the accumulator
    dtype. The dK/dV kernel builds the transposed tiles (keys as rows); the values are the same.
    """
    acc = lse.dtype
    q_tile = q[:, :, q_start:q_end].to(acc)  # (B, H, bq, D)
    k_tile = k[:, :, k_start:k_end].to(acc)  # (B, H, bk, D)
    v_tile = v[:, :, k_start:k_end].to(acc)  # (B, H, bk, D)
    do_tile = do[:, :, q_start:q_end].to(acc)  # (B, H, bq, D)
    scores = (q_tile @ k_tile.transpose(-2, -1)) * scale  # (B, H, bq, bk)
    p = torch.exp(scores - lse[:, :, q_start:q_end, None])  # softmax without a second max pass
    p = p.masked_fill(_causal_mask(q_start, q_end, k_start, k_end, q.device), 0.0)
    dp = do_tile @ v_tile.transpose(-2, -1)  # (B, H, bq, bk) dL/dP
    ds = p * (dp - delta[:, :, q_start:q_end, None])  # (B, H, bq, bk) dL/d(scaled scores)
    return q_tile, k_tile, do_tile, p, ds


def flash_backward(q, k, v, o, lse, do, scale: float, block_q: int = BLOCK_Q, block_k: int = BLOCK_K):
    """Gradients of flash_forward by recomputation. Returns (dq, dk, dv) in q's dtype.

    Two separate sweeps, as in the kernel: one per K/V tile for dK, dV and one per Q tile for
    dQ, so no tile ever adds into another block's output (the kernel needs no atomics).
    """
    B, H, T, D = q.shape
    acc = lse.dtype
    rounded = q.dtype  # P and dS are rounded to this before each matmul, like the kernel
    delta = (do.to(acc) * o.to(acc)).sum(dim=-1)  # (B, H, T) rowsum(dO * O) = rowsum(P * dP)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    for k_start in range(0, T, block_k):  # kernel: attention_backward_dkdv, one block per K tile
        k_end = min(k_start + block_k, T)
        dk_acc = torch.zeros(B, H, k_end - k_start, D, dtype=acc, device=q.device)
        dv_acc = torch.zeros_like(dk_acc)
        # causal: Q tiles that end before k_start see none of these keys
        for q_start in range((k_start // block_q) * block_q, T, block_q):
            q_end = min(q_start + block_q, T)
            q_tile, _, do_tile, p, ds = _recompute_tile(
                q, k, v, do, lse, delta, q_start, q_end, k_start, k_end, scale)
            dv_acc += p.to(rounded).to(acc).transpose(-2, -1) @ do_tile  # (B, H, bk, D) Pᵀ dO
            dk_acc += ds.to(rounded).to(acc).transpose(-2, -1) @ q_tile  # (B, H, bk, D) dSᵀ Q
        dk[:, :, k_start:k_end] = (dk_acc * scale).to(k.dtype)  # scale once, in fp32, at the end
        dv[:, :, k_start:k_end] = dv_acc.to(v.dtype)
    # dQ = scale dS (K - k_mean): rows of dS sum to 0, so shifting all keys by one vector changes
    # nothing in exact math, but it stops large components shared by all keys (those that push
    # fp16 scores past 65,504) from multiplying the rounding errors in dS, lse and delta
    k_mean = k.to(acc).mean(dim=2, keepdim=True)  # (B, H, 1, D)
    k_centered = (k.to(acc) - k_mean).to(rounded).to(acc)  # (B, H, T, D) 16-bit, like kc_tile
    for q_start in range(0, T, block_q):  # kernel: attention_backward_dq, one block per Q tile
        q_end = min(q_start + block_q, T)
        dq_acc = torch.zeros(B, H, q_end - q_start, D, dtype=acc, device=q.device)
        for k_start in range(0, q_end, block_k):
            k_end = min(k_start + block_k, T)
            _, k_tile, _, _, ds = _recompute_tile(
                q, k, v, do, lse, delta, q_start, q_end, k_start, k_end, scale)
            kc_tile = k_centered[:, :, k_start:k_end]  # (B, H, bk, D)
            dq_acc += ds.to(rounded).to(acc) @ kc_tile  # (B, H, bq, D) dS (K - k_mean)
        dq[:, :, q_start:q_end] = (dq_acc * scale).to(q.dtype)
    return dq, dk, dv
