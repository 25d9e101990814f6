"""The LM head and cross-entropy in one step, in row chunks, with the gradients worked out as it
goes (the "fused linear cross-entropy" of Liger-Kernel and others).

Plain `cross_entropy(hidden @ W.T, targets)` materialises [tokens, vocab] logits and then, in the
backward pass, a log-softmax of the same size and its gradient: for a batch of 8 x 128 tokens
and a 49k vocabulary, three float32 tensors of 200 MB, most of whose cost is touching fresh
memory. Here each chunk's logits live only while that chunk is handled: the loss, d loss /
d hidden and (when the head trains) d loss / d W are computed on the spot; backward only scales
them by the incoming gradient.
"""

from __future__ import annotations

from typing import Any

import torch

CHUNK_VALUES = 1 << 23  # logits per chunk (32 MB of float32): rows = this // vocab


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore: int, softcap: float
    ) -> torch.Tensor:
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        count = (targets != ignore).sum().clamp(min=1)
        grad_h = torch.empty_like(hidden) if want_h else None
        wide = torch.promote_types(hidden.dtype, torch.float32)  # float32 at least, for the softmax
        grad_w = torch.zeros(weight.shape, dtype=wide, device=weight.device) if want_w else None
        total = torch.zeros((), dtype=wide, device=hidden.device)
        rows = max(1, CHUNK_VALUES // weight.shape[0])
        for start in range(0, hidden.shape[0], rows):
            h, t = hidden[start : start + rows], targets[start : start + rows]
            logits = (h @ weight.t()).to(wide)
            capped = None
            if softcap:
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            keep = t != ignore
            picked = t.clamp(min=0)
            lse = torch.logsumexp(logits, dim=-1)
            total += ((lse - logits.gather(1, picked[:, None])[:, 0]) * keep).sum()
            if grad_h is None and grad_w is None:
                continue
            grad = logits.sub_(lse[:, None]).exp_()  # softmax, in the logits' memory
            grad[torch.arange(len(t), device=t.device), picked] -= 1
            grad *= (keep / count)[:, None]
            if capped is not None:
                grad *= 1 - capped * capped  # d(cap * tanh(z / cap)) / dz
            if grad_h is not None:
                grad_h[start : start + rows] = (grad.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_w is not None:
                grad_w += grad.t() @ h.to(wide)
        ctx.save_for_backward(grad_h, grad_w)
        return total / count

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_h, grad_w = ctx.saved_tensors
        scale = lambda g: None if g is None else g * grad_out.to(g.dtype)  # noqa: E731
        return scale(grad_h), scale(grad_w), None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, softcap: float = 0.0
) -> torch.Tensor:
    """Mean cross-entropy of softmax(hidden @ weight.T) (logits soft-capped if `softcap`) against
    `targets`, skipping `ignore_index`: hidden [N, D], weight [vocab, D], targets [N]."""
    return _LinearCrossEntropy.apply(hidden, weight, targets, ignore_index, softcap)
