"""Feature-interaction layers.

FMInteraction:  sum_{i<j} <e_i, e_j> = 1/2 * sum_k [ (sum_i e_ik)^2 - sum_i e_ik^2 ]
"""
from __future__ import annotations

import torch

from zoo_torch.layers.base import Module, hand_written_backward


class FMInteraction(Module):
    """[B, F, d] -> [B] second-order FM term (or [B, d] with ``reduce_sum=False``)."""

    def __init__(self, reduce_sum: bool = True):
        super().__init__()
        self.reduce_sum = reduce_sum

    def forward(self, e):
        if self.reduce_sum:
            if e.requires_grad and hand_written_backward():
                return _FMSum.apply(e)                 # eager training: closed-form backward
            return _fm_sum(e)[0]                       # inference / export / torch.compile: the same formula
        s = e.sum(1)
        return 0.5 * (s * s - (e * e).sum(1))

    def share(self, e):
        """``(FM term [B], e)`` for a model whose other parts read the same ``e`` (DeepFM's DNN).

        Same values as ``(self(e), e)``; in training, the returned ``e``'s gradient G gets the FM
        gradient folded in as ``G - g e + g s`` in two passes.  Autograd would instead write the FM
        gradient to a fresh [B, F, d] tensor and then add the two gradients out of place.
        """
        if self.reduce_sum and e.requires_grad and hand_written_backward():
            return _FMShare.apply(e)
        return self(e), e


def _fm_sum(e):
    """(y [B], s [B, d]): y_b = 1/2 (||s_b||^2 - ||e_b||_F^2), s_b = sum_i e_bi."""
    s = e.sum(1)
    flat = e.reshape(e.shape[0], -1)
    return 0.5 * ((s * s).sum(1) - torch.linalg.vector_norm(flat, dim=1).square()), s


class _FMSum(torch.autograd.Function):
    """:func:`_fm_sum` with the closed-form gradient dy_b/de_bi = s_b - e_bi: one pass over
    [B, F, d] each way instead of autograd's five."""

    @staticmethod
    def forward(ctx, e):
        out, s = _fm_sum(e)
        ctx.save_for_backward(e, s)
        return out

    @staticmethod
    def backward(ctx, g):
        e, s = ctx.saved_tensors
        return (s.unsqueeze(1) - e).mul_(g.view(-1, 1, 1))


class _FMShare(torch.autograd.Function):
    """``(y, e)``: :func:`_fm_sum`'s y, and ``e`` passed on; the backward returns
    ``G + g (s - e)`` (G: the passed-on ``e``'s gradient) without an intermediate FM gradient."""

    @staticmethod
    def forward(ctx, e):
        out, s = _fm_sum(e)
        ctx.save_for_backward(e, s)
        ctx.set_materialize_grads(False)          # an unused output's gradient stays None, not zeros
        return out, e.view_as(e)

    @staticmethod
    def backward(ctx, g, grad_e):
        if g is None:
            return grad_e
        e, s = ctx.saved_tensors
        g3 = g.view(-1, 1, 1)
        if grad_e is None:
            return (s.unsqueeze(1) - e).mul_(g3)
        return torch.addcmul(grad_e, e, g3, value=-1.0).add_((s * g.unsqueeze(1)).unsqueeze(1))
