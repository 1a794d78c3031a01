"""Read and write a whole (TP1/PP1/EP1) megatron_sv GPT model as ``LayerState``s, in one process.

Design (documented in docs/conversion.md): conversion runs in a single process. A torch_dist checkpoint
addresses every tensor by its global offsets, so a checkpoint saved at any TP/PP/EP loads into the
TP1/PP1/EP1 model built here, and a checkpoint this process saves loads at any target layout (the tests
check both directions). The target layout only decides the vocabulary padding and is validated up front.
"""

from __future__ import annotations

import os
import socket
from typing import Dict, Iterator, Optional, Set

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_sv.checkpointing import load_checkpoint, save_checkpoint
from megatron_sv.conversion.canonical import Branch, ConversionError, LayerState, NormGroup
from megatron_sv.models.gpt.model import ParallelLayout, build_gpt_model, transformer_config
from megatron_sv.platform import initialize_distributed


# ----------------------------------------------------------------------------------------------------
# process and model
# ----------------------------------------------------------------------------------------------------
def ensure_single_process() -> None:
    """Megatron-Core parallel state for one rank (TP=PP=EP=1), created when absent."""
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise ConversionError(
                "checkpoint conversion runs in a single process; do not launch it with "
                "torchrun / several ranks (any target layout is produced by one process)"
            )
        if not parallel_state.model_parallel_is_initialized():
            initialize_distributed(seed=0)
        elif (
            parallel_state.get_tensor_model_parallel_world_size() != 1
            or parallel_state.get_pipeline_model_parallel_world_size() != 1
        ):
            raise ConversionError("conversion needs TP=PP=1 parallel state in this process")
        return
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise ConversionError("checkpoint conversion runs in a single process; do not launch it with torchrun")
    # a world of one rendezvouses with nobody: any free local port will do (an inherited MASTER_PORT may
    # belong to the parent process)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")

    initialize_distributed(seed=0)


def build_model(shape, sv):
    """The full model on this single rank, without random initialization (every tensor is written)."""
    ensure_single_process()
    config = transformer_config(shape, ParallelLayout(), perform_initialization=False)
    model = build_gpt_model(shape, sv, config, pre_process=True, post_process=True, init_seed=0)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_model_checkpoint(root: str, model) -> Dict:
    """Load the tracker's checkpoint (model weights only) into ``model``; returns the common state."""
    state = load_checkpoint(root, [model], optimizer=None, scheduler=None, load_rng=False, log=lambda s: None)
    if state is None:
        raise ConversionError(f"{root!r} holds no checkpoint")
    return state


def save_model_checkpoint(root: str, iteration: int, model, extra: Dict) -> str:
    return save_checkpoint(root, iteration, [model], optimizer=None, scheduler=None, extra=extra, log=lambda s: None)


# ----------------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------------
def _vec(module) -> Optional[torch.Tensor]:
    if module is None:
        return None
    with torch.no_grad():
        return module().detach().float().clone()


def _norm_scale(norm) -> Optional[torch.Tensor]:
    return _vec(getattr(norm, "scale", None))


def _output_norm(norm, size: int) -> torch.Tensor:
    v = _norm_scale(norm)
    return v if v is not None else torch.ones(size)


def _column_branches(lin, prefix: str = "") -> Dict[str, Branch]:
    """Branches of a ScaledColumnParallelLinear at TP1 (qkv handled by the caller)."""
    w = lin.weight.detach().float()
    n = len(lin.branches)
    rows = w.shape[0] // n
    out = {}
    for i, b in enumerate(lin.branches):
        out[prefix + b] = Branch(
            w[i * rows : (i + 1) * rows].clone(),
            _vec(lin.input_scales[b]) if b in lin.input_scales else None,
            _vec(lin.output_scales[b]) if b in lin.output_scales else None,
            b in lin.inner_norm_branches,
        )
    return out


def read_layer(layer, shape) -> LayerState:
    attn = layer.self_attention
    qkv = attn.linear_qkv
    nh = shape.num_attention_heads
    ng = shape.num_query_groups or nh
    hn = shape.hidden_size // nh
    w = qkv.weight.detach().float().view(ng, nh // ng + 2, hn, -1)
    weights = {
        "q": w[:, : nh // ng].reshape(nh * hn, -1).clone(),
        "k": w[:, -2].reshape(ng * hn, -1).clone(),
        "v": w[:, -1].reshape(ng * hn, -1).clone(),
    }
    branches = {
        b: Branch(
            weights[b],
            _vec(qkv.input_scales[b]) if b in qkv.input_scales else None,
            _vec(qkv.output_scales[b]) if b in qkv.output_scales else None,
            b in qkv.inner_norm_branches,
        )
        for b in ("q", "k", "v")
    }
    attn_group = NormGroup(_norm_scale(layer.input_layernorm), branches)
    q_norm = k_norm = post_attn = post_mlp = None
    if shape.qk_layernorm:
        q_norm, k_norm = _output_norm(attn.q_layernorm, hn), _output_norm(attn.k_layernorm, hn)
    if shape.post_sublayer_norm:
        post_attn = _output_norm(attn.linear_proj.post_norm, shape.hidden_size)
    mlp = layer.mlp
    if shape.num_experts:
        router = mlp.router
        mb = {
            "router": Branch(
                router.weight.detach().float().clone(), _vec(router.input_scale), _vec(router.output_scale), False
            )
        }
        down = []
        for e, expert in enumerate(mlp.experts.local_experts):
            mb.update(_column_branches(expert.linear_fc1, f"e{e}."))
            down.append(expert.linear_fc2.weight.detach().float().clone())
        if shape.post_sublayer_norm:
            post_mlp = _output_norm(mlp.post_norm, shape.hidden_size)
    else:
        mb = _column_branches(mlp.linear_fc1)
        down = [mlp.linear_fc2.weight.detach().float().clone()]
        if shape.post_sublayer_norm:
            post_mlp = _output_norm(mlp.linear_fc2.post_norm, shape.hidden_size)
    return LayerState(
        attn_group,
        attn.linear_proj.weight.detach().float().clone(),
        q_norm,
        k_norm,
        post_attn,
        NormGroup(_norm_scale(layer.pre_mlp_layernorm), mb),
        down,
        post_mlp,
    )


def read_embedding(model) -> torch.Tensor:
    return model.embedding.word_embeddings.weight.detach().float()


def read_final(model, shape) -> NormGroup:
    tied = not shape.untie_embeddings_and_output_weights
    w = read_embedding(model) if tied else model.output_layer.weight.detach().float()
    return NormGroup(
        _norm_scale(model.decoder.final_layernorm), {"lm_head": Branch(w)}, frozen=("lm_head",) if tied else ()
    )


def layers(model) -> Iterator:
    return iter(model.decoder.layers)


# ----------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------
class Writer:
    """Writes tensors into a model and remembers which parameters were written, so an incomplete
    conversion is caught (``check_complete``) instead of leaving uninitialized memory in a checkpoint."""

    def __init__(self, model):
        self.model = model
        self.written: Set[int] = set()

    def tensor(self, param: torch.Tensor, value: torch.Tensor, name: str) -> None:
        if tuple(param.shape) != tuple(value.shape):
            raise ConversionError(f"{name}: shape {tuple(value.shape)} does not fit the model's {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(value.to(param.dtype))
        self.written.add(id(param))

    def vector(self, module, value: Optional[torch.Tensor], name: str) -> None:
        if module is None:
            if value is not None and not bool(torch.all(value == 1)):
                raise ConversionError(f"internal: {name} has a value but the target model has no such vector")
            return
        if value is None:
            value = torch.ones(module.spec.size)
        module.set_value(value)
        for p in module.parameters():
            self.written.add(id(p))

    def norm(self, norm, value: Optional[torch.Tensor], name: str) -> None:
        self.vector(getattr(norm, "scale", None), value, name)
        if getattr(norm, "bias", None) is not None:
            raise ConversionError("LayerNorm models are not supported by this conversion")

    def check_complete(self) -> None:
        missing = [n for n, p in self.model.named_parameters() if id(p) not in self.written]
        if missing:
            raise ConversionError(f"internal: {len(missing)} parameters were not written, e.g. {missing[:4]}")


def _write_column(wr: Writer, lin, branches: Dict[str, Branch], prefix: str, name: str) -> None:
    wr.tensor(lin.weight, torch.cat([branches[prefix + b].weight for b in lin.branches], 0), name + ".weight")
    for b in lin.branches:
        br = branches[prefix + b]
        wr.vector(lin.input_scales[b] if b in lin.input_scales else None, br.in_scale, f"{name}.input_scales.{b}")
        wr.vector(lin.output_scales[b] if b in lin.output_scales else None, br.out_scale, f"{name}.output_scales.{b}")


def write_layer(wr: Writer, layer, st: LayerState, shape, name: str) -> None:
    attn = layer.self_attention
    qkv = attn.linear_qkv
    nh = shape.num_attention_heads
    ng = shape.num_query_groups or nh
    hn = shape.hidden_size // nh
    br = st.attn.branches
    h = br["q"].weight.shape[1]
    fused = torch.cat(
        [
            br["q"].weight.view(ng, nh // ng, hn, h),
            br["k"].weight.view(ng, 1, hn, h),
            br["v"].weight.view(ng, 1, hn, h),
        ],
        dim=1,
    ).reshape(-1, h)
    wr.tensor(qkv.weight, fused, f"{name}.linear_qkv.weight")
    for b in ("q", "k", "v"):
        wr.vector(qkv.input_scales[b] if b in qkv.input_scales else None, br[b].in_scale, f"{name}.qkv.in.{b}")
        wr.vector(qkv.output_scales[b] if b in qkv.output_scales else None, br[b].out_scale, f"{name}.qkv.out.{b}")
    wr.norm(layer.input_layernorm, st.attn.gamma, f"{name}.input_layernorm")
    wr.tensor(attn.linear_proj.weight, st.o_proj, f"{name}.linear_proj.weight")
    if shape.qk_layernorm:
        wr.norm(attn.q_layernorm, st.q_norm, f"{name}.q_layernorm")
        wr.norm(attn.k_layernorm, st.k_norm, f"{name}.k_layernorm")
    if shape.post_sublayer_norm:
        wr.norm(attn.linear_proj.post_norm, st.post_attn_norm, f"{name}.linear_proj.post_norm")
    mlp = layer.mlp
    wr.norm(layer.pre_mlp_layernorm, st.mlp.gamma, f"{name}.pre_mlp_layernorm")
    if shape.num_experts:
        router = mlp.router
        rb = st.mlp.branches["router"]
        wr.tensor(router.weight, rb.weight, f"{name}.router.weight")
        wr.vector(router.input_scale, rb.in_scale, f"{name}.router.input_scale")
        wr.vector(router.output_scale, rb.out_scale, f"{name}.router.output_scale")
        for e, expert in enumerate(mlp.experts.local_experts):
            _write_column(wr, expert.linear_fc1, st.mlp.branches, f"e{e}.", f"{name}.experts.{e}.linear_fc1")
            wr.tensor(expert.linear_fc2.weight, st.down[e], f"{name}.experts.{e}.linear_fc2.weight")
        if shape.post_sublayer_norm:
            wr.norm(mlp.post_norm, st.post_mlp_norm, f"{name}.mlp.post_norm")
    else:
        _write_column(wr, mlp.linear_fc1, st.mlp.branches, "", f"{name}.linear_fc1")
        wr.tensor(mlp.linear_fc2.weight, st.down[0], f"{name}.linear_fc2.weight")
        if shape.post_sublayer_norm:
            wr.norm(mlp.linear_fc2.post_norm, st.post_mlp_norm, f"{name}.linear_fc2.post_norm")


def write_embedding(wr: Writer, model, embed: torch.Tensor) -> None:
    wr.tensor(model.embedding.word_embeddings.weight, embed, "embedding.word_embeddings.weight")


def write_final(wr: Writer, model, shape, final: NormGroup) -> None:
    wr.norm(model.decoder.final_layernorm, final.gamma, "decoder.final_layernorm")
    if shape.untie_embeddings_and_output_weights:
        wr.tensor(model.output_layer.weight, final.branches["lm_head"].weight, "output_layer.weight")


def pad_rows(w: torch.Tensor, rows: int) -> torch.Tensor:
    """Vocabulary padding: extra rows are zero (their logits are 0; no label ever points at them)."""
    if w.shape[0] == rows:
        return w
    if w.shape[0] > rows:
        return w[:rows]
    return torch.cat([w, torch.zeros(rows - w.shape[0], w.shape[1], dtype=w.dtype)], 0)
