"""Scale vectors away from their init of 1 (test helper)."""

from __future__ import annotations

import zlib

import torch
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_sv.scale_vectors.vector import ScaleVector


def randomize_vectors(model):
    """Scale vectors away from their init of 1 (where W_eff == W and a missing fold is invisible), the same
    values at every layout: drawn from the vector's global name (pipeline stages number layers locally)."""
    global_prefix = {
        f"{n}.": f"decoder.layers.{m.layer_number - 1}."
        for n, m in model.named_modules()
        if isinstance(m, TransformerLayer)
    }
    for name, m in model.named_modules():
        if not isinstance(m, ScaleVector) or ".experts." in name:
            continue
        for local, glob in global_prefix.items():
            if name.startswith(local):
                name = glob + name[len(local) :]
                break
        gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        m.set_value(0.5 + torch.rand(m.spec.size, generator=gen))
