"""Feature-interaction layers.

FMInteraction:  sum_{i<j} <e_i, e_j> = 1/2 * sum_k [ (sum_i e_ik)^2 - sum_i e_ik^2 ]
"""
from __future__ import annotations

from zoo_torch.layers.base import Module


class FMInteraction(Module):
    """[B, F, d] -> [B] second-order FM term (or [B, d] with ``reduce_sum=False``)."""

    def __init__(self, reduce_sum: bool = True):
        super().__init__()
        self.reduce_sum = reduce_sum

    def forward(self, e):
        s = e.sum(1)
        out = 0.5 * (s * s - (e * e).sum(1))
        return out.sum(1) if self.reduce_sum else out
