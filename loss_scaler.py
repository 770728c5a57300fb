"""fp16's dynamic loss scaler, by hand (not torch.amp.GradScaler): one screen, so a reader sees every rule.

train.py multiplies the loss by `scale` before backward, calls `unscale_and_clip` once before the optimizer,
and asks `update(overflow)` whether to skip the step. bf16 and fp32 runs use the same calls with the scale
fixed at 1. Not in here: the overflow all-reduce across ranks (train.py) or the optimizer.
"""
import torch

from distributed import full


class DynamicLossScaler:
    """fp16's dynamic loss scale, by hand: multiply the loss up so small gradients survive 16 bits,
    divide the gradients back down, and skip any step whose gradients overflowed.

    Overflow: if `hysteresis` overflows have been used up, scale *= backoff (not below min_scale);
    otherwise one unit of hysteresis is spent. Either way the step is skipped. Hysteresis refills when
    the scale grows (DeepSpeed's default; with hysteresis 1 this is torch's GradScaler).
    Clean step: after growth_interval clean steps in a row, scale *= growth.
    Disabled (bf16/fp32): scale stays 1 and steps are never skipped.
    """

    def __init__(self, cfg, enabled: bool):
        self.cfg, self.enabled = cfg, enabled
        self.scale = cfg.init_scale if enabled else 1.0
        self.clean_steps = 0  # clean steps since the last overflow or growth
        self.hysteresis_left = cfg.hysteresis
        self.consecutive_skips = 0
        self.skipped_steps = 0

    def update(self, overflow: bool) -> bool:
        """Record this step's overflow flag (the same on every rank); returns True if the step must be skipped."""
        if not self.enabled:
            return False
        if not overflow:
            self.consecutive_skips, self.clean_steps = 0, self.clean_steps + 1
            if self.clean_steps == self.cfg.growth_interval:
                self.scale *= self.cfg.growth_factor
                self.clean_steps, self.hysteresis_left = 0, self.cfg.hysteresis
            return False
        self.skipped_steps += 1
        self.consecutive_skips += 1
        self.clean_steps = 0
        if self.consecutive_skips >= self.cfg.max_consecutive_skips:
            raise FloatingPointError(f"{self.consecutive_skips} overflowing steps in a row (loss scale {self.scale:g}); "
                                     "the run is diverging — see the attention diagnostics, or raise "
                                     "--loss-scale.max-consecutive-skips")
        if self.hysteresis_left > 1:
            self.hysteresis_left -= 1
        elif self.scale <= self.cfg.min_scale:
            raise FloatingPointError(f"gradient overflow at the minimum loss scale {self.scale:g} "
                                     "(--loss-scale.min-scale); the fp16 run cannot continue")
        else:
            self.scale = max(self.scale * self.cfg.backoff_factor, self.cfg.min_scale)
        return True

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("scale", "clean_steps", "hysteresis_left", "consecutive_skips",
                                              "skipped_steps")}

    def load_state_dict(self, state: dict):
        for key, value in state.items():
            setattr(self, key, value)


def unscale_and_clip(params: list, scaler: DynamicLossScaler, max_norm: float) -> torch.Tensor:
    """Divide gradients by the loss scale (once), then clip; returns the true global norm before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    if scaler.scale != 1.0:
        torch._foreach_mul_(grads, 1.0 / scaler.scale)
    return full(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"), foreach=True))
