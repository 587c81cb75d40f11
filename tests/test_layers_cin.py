"""CIN (xDeepFM): the training path's hand-written backward (``_CINMap``) against autograd."""
from __future__ import annotations

import pytest
import torch

from zoo_torch.layers.cin import CIN, _CINMap


def test_cin_map_gradcheck():
    g = torch.Generator().manual_seed(0)
    n, h, m, out = 7, 3, 4, 5
    args = [torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True),
            torch.randn(n, m, generator=g, dtype=torch.float64, requires_grad=True),
            torch.randn(h * m, out, generator=g, dtype=torch.float64, requires_grad=True),
            torch.randn(out, generator=g, dtype=torch.float64, requires_grad=True)]
    assert torch.autograd.gradcheck(_CINMap.apply, args)
    # the strided slice the CIN hands to the next layer works as input too
    wide = torch.randn(n, 2 * h, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w, *a: _CINMap.apply(w[:, :h], *a), [wide] + args[1:])


@pytest.mark.parametrize("split_half", [True, False])
def test_cin_training_path_equals_plain_formula(split_half):
    torch.manual_seed(0)
    cin = CIN(5, (6, 4, 3), split_half=split_half).double()
    for p in cin.parameters():
        torch.nn.init.normal_(p, std=0.3)
    e = torch.randn(8, 5, 3, dtype=torch.float64, requires_grad=True)
    fast = cin(e)                                   # grad enabled: _CINMap
    g_fast = torch.autograd.grad(fast.square().sum(), [e, *cin.parameters()])
    with torch.no_grad():
        plain_value = cin(e)                        # the plain formula (inference / export path)
    torch.testing.assert_close(fast, plain_value)

    def plain(e):                                   # the plain formula, differentiated by autograd
        b, m, d = e.shape
        x0 = e.transpose(1, 2).reshape(b * d, m)
        x, pooled = x0, []
        for k, layer in enumerate(cin.layers):
            xk = layer((x.unsqueeze(-1) * x0.unsqueeze(-2)).flatten(1))
            pooled.append(xk.view(b, d, -1)[..., cin.pool_from[k]:].sum(1))
            x = xk[:, :cin.next_maps[k]]
        return torch.cat(pooled, -1)

    ref = plain(e)
    g_ref = torch.autograd.grad(ref.square().sum(), [e, *cin.parameters()])
    torch.testing.assert_close(fast, ref)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b)
