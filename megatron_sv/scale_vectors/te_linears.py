"""What the Transformer Engine (TE) backend needs that does not need TE: availability and the checkpoint schema.

TE is imported lazily: importing this module never touches it, and asking for the TE backend
(models/gpt/backends.py, which imports te_modules.py) on a machine without TE (or without CUDA) raises
``TransformerEngineUnavailable`` with a plain message. The local backend (``linears.py``) is unaffected.

Two ways a norm meets its input-side map on TE (models/gpt/backends.py chooses):
  * ``standard`` (one shared plain gamma, nothing to fold, ``fuses_norm_into_linear``): TE's fused norm +
    GEMM. The norm writes the FP8 input of the FP8 GEMM directly.
  * every other strategy: our ``ScaledNorm`` followed by TE's GEMM with the branch scale vectors of
    branches.py (the same mixin as the local and FP8 linears): TE quantizes the folded weight W_eff.

Checkpoint keys: TE modules save in the local schema, so a checkpoint moves between backends unchanged:
  * TE's fused ``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight`` (and ``_bias``)
    are saved as the local ``input_layernorm.scale.weight`` / ``pre_mlp_layernorm.scale.weight``
    (``.bias``); see ``te_key_to_local`` / ``local_key_to_te``.
  * ``_extra_state`` of the linears keeps its name: Megatron's local linears write the same keys (value
    None), TE writes its FP8 scaling metadata there, and TE reads a None as "no state" (a local
    checkpoint starts TE's delayed-scaling amax history afresh; ``tensorwise`` scaling has none).
  * TE attention's ``core_attention._extra_state`` has no local counterpart: not saved, and tolerated
    as missing on load (FP8 attention metadata only; TE itself tolerates it missing).
Both ``sharded_state_dict`` (dist checkpointing) and ``state_dict`` / ``load_state_dict`` follow this.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Dict, Mapping, Optional, Tuple

import torch

TE_INSTALL_HINT = (
    "--transformer-impl transformer_engine needs NVIDIA Transformer Engine on a CUDA "
    "machine (pip install --no-build-isolation transformer_engine[pytorch]); "
    "use --transformer-impl local otherwise"
)


class TransformerEngineUnavailable(ImportError):
    """Raised when the TE backend is requested where Transformer Engine cannot run."""


def transformer_engine_status() -> Tuple[bool, str]:
    """(usable, reason). Usable means ``import transformer_engine.pytorch`` works and CUDA is present."""
    if not torch.cuda.is_available():
        return False, "no CUDA device is available"
    try:
        import transformer_engine.pytorch  # noqa: F401, PLC0415 - a probe: TE is optional
    except Exception as exc:  # ImportError, or a broken install raising OSError/RuntimeError
        return False, f"Transformer Engine cannot be imported ({type(exc).__name__}: {exc})"
    return True, "ok"


def require_transformer_engine() -> None:
    ok, reason = transformer_engine_status()
    if not ok:
        raise TransformerEngineUnavailable(f"{TE_INSTALL_HINT}: {reason}")


# -- which strategies TE's fused norm + GEMM can hold ---------------------------------------------------
def fuses_norm_into_linear(sv) -> bool:
    """True when TE's fused norm+GEMM can hold the strategy's pre-norm exactly (one plain shared gamma)."""
    return sv.learnable and not sv.folds_into_weights and sv.reparam == "none"


# -- checkpoint key schema ----------------------------------------------------------------------------
# (TE module path, local norm path) of the norms that TE fuses into the following GEMM.
FUSED_NORM_SITES = (("self_attention.linear_qkv", "input_layernorm"), ("mlp.linear_fc1", "pre_mlp_layernorm"))
# TE parameter name -> local parameter name inside the norm.
FUSED_NORM_PARAMS = (("layer_norm_weight", "scale.weight"), ("layer_norm_bias", "bias"))
EXTRA_STATE = "_extra_state"

_TE_TO_LOCAL = [
    (re.compile(rf"^(.*?)(?<![^.]){re.escape(te_mod)}\.{te_p}$"), f"{loc_mod}.{loc_p}")
    for te_mod, loc_mod in FUSED_NORM_SITES
    for te_p, loc_p in FUSED_NORM_PARAMS
]
_LOCAL_TO_TE = [
    (re.compile(rf"^(.*?)(?<![^.]){re.escape(loc_mod)}\.{re.escape(loc_p)}$"), f"{te_mod}.{te_p}")
    for te_mod, loc_mod in FUSED_NORM_SITES
    for te_p, loc_p in FUSED_NORM_PARAMS
]


_TE_ONLY_STATE = re.compile(rf"(^|.*\.)core_attention\.(.*\.)?{EXTRA_STATE}$")


def is_te_only_state(key: str) -> bool:
    """TE attention's FP8 metadata: the local core attention has no state to match it."""
    return _TE_ONLY_STATE.match(key) is not None


def te_key_to_local(key: str) -> Optional[str]:
    """The local-schema key of a TE model's state-dict key; None for TE-only state."""
    if is_te_only_state(key):
        return None
    for pattern, local in _TE_TO_LOCAL:
        m = pattern.match(key)
        if m:
            return m.group(1) + local
    return key


def local_key_to_te(key: str, fused_norms: bool) -> str:
    """The TE model's key for a local-schema key (norm keys move only where TE fuses the norm)."""
    if fused_norms:
        for pattern, te in _LOCAL_TO_TE:
            m = pattern.match(key)
            if m:
                return m.group(1) + te
    return key


def te_state_dict_to_local(state_dict: Mapping[str, object]) -> Dict[str, object]:
    out = {}
    for k, v in state_dict.items():
        new = te_key_to_local(k)
        if new is None:
            continue
        if new in out:
            raise ValueError(f"two TE keys map to the local key {new!r}")
        out[new] = v
    return out


def local_state_dict_to_te(state_dict: Mapping[str, object], fused_norms: bool) -> Dict[str, object]:
    out = {}
    for k, v in state_dict.items():
        new = local_key_to_te(k, fused_norms)
        if new in out:
            raise ValueError(f"two local keys map to the TE key {new!r}")
        out[new] = v
    return out


# State-dict hooks of the TE modules (pure functions of the dicts; registered in the modules below).
def save_in_local_schema(module, state_dict, prefix, local_metadata) -> None:
    """state_dict post-hook: rename this module's keys to the local schema, drop TE-only state."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        new = te_key_to_local(key)
        if new is None:
            del state_dict[key]
        elif new != key:
            state_dict[new] = state_dict.pop(key)


def load_from_local_schema(
    module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
) -> None:
    """load_state_dict pre-hook: fetch this module's fused-norm params from their local keys.

    The local norm keys belong to a sibling module slot (``input_layernorm``, an IdentityOp on TE) that
    strict loading has already flagged as unexpected; they are taken back from that list here.
    """
    for te_name, _ in FUSED_NORM_PARAMS:
        te_key = prefix + te_name
        local = te_key_to_local(te_key)
        if local != te_key and local in state_dict and te_key not in state_dict:
            state_dict[te_key] = state_dict.pop(local)
            if local in unexpected_keys:
                unexpected_keys.remove(local)


def tolerate_missing_te_only_state(module, incompatible_keys) -> None:
    """load_state_dict post-hook: a local-schema state dict has no TE-only state."""
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if not is_te_only_state(k)]


def sharded_in_local_schema(sharded: dict) -> dict:
    """Rename the checkpoint keys (``.key``, not the dict keys: those must stay the module's own names
    for ``load_state_dict``) of a TE module's sharded state dict to the local schema; drop TE-only state."""
    out = {}
    for name, sh in sharded.items():
        if is_te_only_state(name):
            continue
        ckpt_key = getattr(sh, "key", None)
        if ckpt_key is not None:
            local = te_key_to_local(ckpt_key)
            if local is not None and local != ckpt_key:
                sh = dataclasses.replace(sh, key=local)
        out[name] = sh
    return out


def install_schema_hooks(module: torch.nn.Module, fused_norm: bool) -> None:
    module.register_state_dict_post_hook(save_in_local_schema)
    module.register_load_state_dict_post_hook(tolerate_missing_te_only_state)
    if fused_norm:
        module.register_load_state_dict_pre_hook(load_from_local_schema)


@contextlib.contextmanager
def gemm_weight(module: torch.nn.Module, tensor: torch.Tensor, name: str = "weight"):
    """Let TE's forward read ``tensor`` where it reads its weight parameter (TE reads weights with
    ``getattr(self, name)`` in every version); the parameter itself is restored on exit."""
    params = module._parameters
    original = params[name]
    params[name] = tensor
    try:
        yield
    finally:
        params[name] = original
