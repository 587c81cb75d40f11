"""CIN (xDeepFM): the training path's hand-written backward (``_CINMap``) against autograd."""
from __future__ import annotations

import pytest
import torch

from zoo_torch.layers.cin import CIN, _CINMap


@pytest.fixture(params=["one chunk", "chunks of 3 rows"])
def chunking(request, monkeypatch):
    """The default chunk budget (one chunk for these small inputs), or 3-row chunks with a remainder."""
    if request.param != "one chunk":
        import zoo_torch.layers.cin as cin_mod
        monkeypatch.setattr(cin_mod, "_chunk_rows", lambda x, x0: 3)
    return request.param


def test_chunk_rows_fit_the_budget():
    import zoo_torch.layers.cin as cin_mod
    x, x0 = torch.zeros(65536, 100), torch.zeros(65536, 39)
    rows = cin_mod._chunk_rows(x, x0)
    assert rows * 100 * 39 * 4 <= cin_mod.CHUNK_BYTES["cpu"] < (rows + 1) * 100 * 39 * 4
    assert cin_mod._chunk_rows(torch.zeros(4, 10 ** 6), torch.zeros(4, 39)) == 1   # never 0 rows


def test_cin_map_gradcheck(chunking):
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
def test_cin_training_path_equals_plain_formula(split_half, chunking):
    torch.manual_seed(0)
    cin = CIN(5, (6, 4, 3), split_half=split_half).double()
    for p in cin.parameters():
        torch.nn.init.normal_(p, std=0.3)
    e = torch.randn(8, 5, 3, dtype=torch.float64, requires_grad=True)
    fast = cin(e)                                   # _CINMap, chunked
    g_fast = torch.autograd.grad(fast.square().sum(), [e, *cin.parameters()])
    with torch.no_grad():
        eval_value = cin(e)                         # evaluation: the same chunked forward
    traced = torch.jit.trace(cin, (e.detach(),))    # export path: the plain formula
    torch.testing.assert_close(fast, eval_value)
    torch.testing.assert_close(traced(e.detach()), fast.detach())
    assert not any(n.kind() == "prim::PythonOp" for n in traced.graph.nodes())   # no _CINMap in the trace

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
