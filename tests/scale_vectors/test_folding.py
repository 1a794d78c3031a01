"""Folded scale vectors equal the straightforward unfolded computation, values and gradients."""

import torch

from megatron_sv.scale_vectors.folding import FoldLayout, fold_into_weight, recompute_saved_weight


def _reference(weight, layout, in_scales, out_scales, x):
    # Unfolded: each slot's rows read x scaled by its own gamma, then rows are scaled by u.
    w = weight.view(layout.groups, layout.slots, layout.rows, -1)
    outs = []
    for g in range(layout.groups):
        for s in range(layout.slots):
            y = (x * in_scales[s]) @ w[g, s].T
            outs.append(y * out_scales[g, s])
    return torch.cat(outs, dim=-1)


def test_fold_matches_unfolded_reference_values_and_grads():
    torch.manual_seed(0)
    layout = FoldLayout(groups=2, slots=3, rows=4)
    d = 5
    weight = torch.randn(layout.out_features, d, dtype=torch.float64, requires_grad=True)
    gam = (1 + 0.3 * torch.randn(layout.slots, d, dtype=torch.float64)).requires_grad_()
    u = (1 + 0.3 * torch.randn(layout.groups, layout.slots, layout.rows, dtype=torch.float64)).requires_grad_()
    x = torch.randn(7, d, dtype=torch.float64)
    dy = torch.randn(7, layout.out_features, dtype=torch.float64)

    ref = _reference(weight, layout, gam, u, x)
    grads_ref = torch.autograd.grad((ref * dy).sum(), (weight, gam, u))

    w_eff = fold_into_weight(weight, layout, gam, u)
    with recompute_saved_weight(w_eff, lambda: fold_into_weight(weight, layout, gam, u).detach()):
        y = x @ w_eff.T
    grads = torch.autograd.grad((y * dy).sum(), (weight, gam, u))
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_fold_gradcheck_input_only_and_output_only():
    torch.manual_seed(1)
    layout = FoldLayout(groups=1, slots=2, rows=3)
    weight = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    gam = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    u = torch.randn(1, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w, g: fold_into_weight(w, layout, g, None), (weight, gam))
    assert torch.autograd.gradcheck(lambda w, v: fold_into_weight(w, layout, None, v), (weight, u))
    assert fold_into_weight(weight, layout) is weight


def test_recompute_saves_a_recipe_not_the_folded_weight():
    """Autograd stores a refold recipe for W_eff (so no weight-sized copy lives until backward)."""
    layout = FoldLayout(groups=1, slots=1, rows=64)
    weight = torch.randn(64, 64, requires_grad=True)
    gam = (torch.rand(1, 64) + 0.5).requires_grad_()
    x = torch.randn(8, 64, requires_grad=True)
    refolds = []

    def refold():
        refolds.append(1)
        return fold_into_weight(weight, layout, gam).detach()

    w_eff = fold_into_weight(weight, layout, gam)
    with recompute_saved_weight(w_eff, refold):
        y = torch.nn.functional.linear(x, w_eff)
    assert refolds == []
    y.sum().backward()
    assert refolds == [1]  # the GEMM's saved weight came from the recipe
    torch.testing.assert_close(x.grad, torch.ones(8, 64) @ w_eff.detach())
    torch.testing.assert_close(weight.grad, (torch.ones(64, 8) @ x.detach()) * gam.detach())
