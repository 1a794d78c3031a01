"""Helpers for the conversion tests: tiny Hugging Face models, megatron_sv source checkpoints made at
TP2 / PP2 with perturbed scale vectors (run inside run_distributed ranks), and logits."""

from __future__ import annotations

import os
import zlib

import torch

SEQ = 16
BATCH = 2
STRATEGIES = ["none", "standard", "hg", "dp", "dnp", "or", "er", "iwd", "unified"]
FOLDABLE = ["none", "standard", "hg", "dp", "or", "er", "iwd"]


def tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(11))


def tiny_hf(kind: str, path: str, vocab: int = 100, seed: int = 0):
    """A 2-layer Llama / Mistral / Mixtral with random norm weights (some negative), saved as safetensors."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        MixtralConfig,
        MixtralForCausalLM,
    )

    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.2,
        rms_norm_eps=1e-5,
    )
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif kind == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=None))
    else:
        model = MixtralForCausalLM(MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.5 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(path)
    return model


def load_hf(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, attn_implementation="eager").eval()


def hf_logits(model, vocab: int) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens(vocab)).logits.float()


def megatron_logits_single(root: str, vocab: int) -> torch.Tensor:
    """Logits of a megatron_sv checkpoint loaded into the TP1 model of this process."""
    from megatron_sv.checkpointing.model_io import read_checkpoint_args, shape_from_args, sv_config_from_args
    from megatron_sv.conversion import megatron_model as M

    _, args = read_checkpoint_args(root)
    model = M.build_model(shape_from_args(args), sv_config_from_args(args))
    M.load_model_checkpoint(root, model)
    t = tokens(vocab)
    with torch.no_grad():
        return model(t, torch.arange(SEQ)[None].expand_as(t), None)[..., :vocab].float()


# ---------------------------------------------------------------------------------------------- ranks
def _source_shape(moe: bool):
    from megatron_sv.models.gpt.model import GPTShape

    return GPTShape(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=128,
        seq_length=SEQ,
        ffn_hidden_size=48,
        init_method_std=0.2,
        norm_epsilon=1e-5,
        num_experts=4 if moe else None,
        moe_router_topk=2,
        moe_ffn_hidden_size=48 if moe else None,
    )


def _global_name(model, name: str) -> str:
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(model.decoder.layers[int(parts[2])].layer_number - 1)
    return ".".join(parts)


def perturb_scale_vectors(model, reparam: str) -> int:
    """Set every scale vector to reproducible random values (same global values on every rank)."""
    from megatron_sv.scale_vectors.vector import ScaleVector

    n = 0
    for name, mod in model.named_modules():
        if isinstance(mod, ScaleVector):
            g = torch.Generator().manual_seed(zlib.crc32(_global_name(model, name).encode()))
            v = 0.5 + torch.rand(mod.spec.size, generator=g)
            if reparam != "er":
                v = torch.where(torch.rand(mod.spec.size, generator=g) < 0.15, -v, v)
            mod.set_value(v)
            n += 1
    return n


def _logits_at_layout(model, pp: int, vocab: int) -> torch.Tensor:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    t = tokens(vocab)
    pos = torch.arange(SEQ)[None].expand_as(t)
    with torch.no_grad():
        if pp == 1:
            out = model(t, pos, None)
            return gather_from_tensor_model_parallel_region(out.contiguous())
        if ps.is_pipeline_first_stage():
            hidden = model(t, pos, None)
            dist.send(hidden.contiguous(), dst=1)
            return None
        hidden = torch.empty(SEQ, BATCH, 32)
        dist.recv(hidden, src=0)
        model.set_input_tensor(hidden)
        return model(t, pos, None)


def _end_task(keep_process_group: bool) -> None:
    """Tear down Megatron's parallel state; the process group too unless the job has more tasks (re-creating
    the default gloo group in one process can hang)."""
    from megatron.core import parallel_state

    from megatron_sv.platform import destroy_distributed

    if keep_process_group:
        parallel_state.destroy_model_parallel()
    else:
        destroy_distributed()


def make_sources(rank, world_size, tp, pp, moe, root, keep_process_group=False):
    """On each rank: for every strategy build the model at TP/PP, perturb its vectors, record logits before
    and after, and save a checkpoint ``root/<strategy>``. Returns {strategy: (logits, unperturbed)}."""
    from megatron_sv.checkpointing import save_checkpoint
    from megatron_sv.checkpointing.model_io import args_for_model
    from megatron_sv.models.gpt.model import ParallelLayout, build_gpt_model, transformer_config
    from megatron_sv.platform import initialize_distributed
    from megatron_sv.scale_vectors.config import strategy_config

    initialize_distributed(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, seed=5)
    shape = _source_shape(moe)
    out = {}
    try:
        for strategy in STRATEGIES:
            sv = strategy_config(strategy)
            config = transformer_config(shape, ParallelLayout(tp, pp, sequence_parallel=False))
            model = build_gpt_model(shape, sv, config, init_seed=7)
            model.eval()
            before = _logits_at_layout(model, pp, 128)
            count = perturb_scale_vectors(model, sv.reparam)
            after = _logits_at_layout(model, pp, 128)
            args = args_for_model(
                shape, strategy, layout=dict(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
            )
            save_checkpoint(os.path.join(root, strategy), 3, [model], extra={"args": args}, log=lambda s: None)
            out[strategy] = (after, before, count)
    finally:
        _end_task(keep_process_group)
    return out


def make_all_sources(rank, world_size, sources):
    """make_sources for every (key, tp, pp, moe, root) of ``sources`` in one job: {key: its result}."""
    out = {key: make_sources(rank, world_size, *rest, keep_process_group=True) for key, *rest in sources}
    _end_task(False)
    return out


def layout_logits(rank, world_size, tp, pp, ep, roots, vocab, keep_process_group=False):
    """Load each checkpoint in ``roots`` at TP/PP/EP and return the full logits (last stage)."""
    from megatron_sv.checkpointing import load_checkpoint
    from megatron_sv.checkpointing.model_io import read_checkpoint_args, shape_from_args, sv_config_from_args
    from megatron_sv.models.gpt.model import ParallelLayout, build_gpt_model, transformer_config
    from megatron_sv.platform import initialize_distributed

    initialize_distributed(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep, seed=5
    )
    out = {}
    try:
        for name, root in roots.items():
            _, args = read_checkpoint_args(root)
            shape, sv = shape_from_args(args), sv_config_from_args(args)
            shape = type(shape)(**{**shape.__dict__, "seq_length": SEQ})
            model = build_gpt_model(
                shape, sv, transformer_config(shape, ParallelLayout(tp, pp, False, ep)), init_seed=99
            )
            load_checkpoint(root, [model], load_rng=False, log=lambda s: None)
            model.eval()
            logits = _logits_at_layout(model, pp, vocab)
            out[name] = None if logits is None else logits[..., :vocab]
    finally:
        _end_task(keep_process_group)
    return out


def all_layout_logits(rank, world_size, layouts, vocab):
    """layout_logits for every (key, tp, pp, ep, roots) of ``layouts`` in one job: {key: its result}."""
    out = {key: layout_logits(rank, world_size, *rest, vocab, keep_process_group=True) for key, *rest in layouts}
    _end_task(False)
    return out
