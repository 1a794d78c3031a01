"""The three conversions of tools/convert_checkpoint.py:

``export_to_hf``      megatron_sv checkpoint (any layout, any strategy) -> Hugging Face safetensors
``import_from_hf``    Llama / Mistral / Mixtral safetensors -> megatron_sv checkpoint (any strategy, any target layout)
``convert_megatron``  megatron_sv -> megatron_sv: another strategy and/or target layout (vocabulary padding)

All checks (directories, files, architecture, shapes, vocabulary, target layout, function changes) run
before any tensor is converted. Outputs are built in a staging directory next to the output and moved
into place only when complete, so a failed conversion leaves nothing half-written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Callable, Dict, List, Optional

import torch

from megatron_sv.checkpointing.model_io import (
    args_for_model,
    load_common_state,
    pretrain_flags,
    read_checkpoint_args,
    shape_from_args,
    sv_config_from_args,
    sv_overrides_from_args,
)
from megatron_sv.conversion import canonical as C
from megatron_sv.conversion import hf as H
from megatron_sv.conversion import megatron_model as M
from megatron_sv.conversion import tokenizer as T
from megatron_sv.conversion.canonical import Branch, ConversionError, LayerState, NormGroup
from megatron_sv.models.gpt.shape import layout_problems, padded_vocab_size
from megatron_sv.scale_vectors.config import STRATEGIES, strategy_config

Log = Callable[[str], None]


# ----------------------------------------------------------------------------------------------------
# shared checks
# ----------------------------------------------------------------------------------------------------
# written into every output directory: --overwrite replaces only a directory that carries it
OUTPUT_MARKER = ".megatron_sv_conversion_output"


def check_output_dir(out: str, overwrite: bool, source: Optional[str] = None) -> None:
    """Refuse an output that overlaps the input, and a non-empty output unless --overwrite is given and
    the directory is an earlier output of this tool: --overwrite never deletes what it did not write."""
    real_out = os.path.realpath(out)
    if source is not None:
        real_src = os.path.realpath(source)
        if real_out == real_src or real_src.startswith(real_out + os.sep) or real_out.startswith(real_src + os.sep):
            raise ConversionError(
                f"output {out!r} overlaps the input {source!r} (one is, or contains, the "
                "other); choose an output directory outside the input"
            )
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise ConversionError(f"output {out!r} exists and is not a directory")
        if os.listdir(out) and not overwrite:
            raise ConversionError(f"output directory {out!r} is not empty; pass --overwrite to replace it")
        if os.listdir(out) and not os.path.isfile(os.path.join(out, OUTPUT_MARKER)):
            raise ConversionError(
                f"--overwrite replaces only an earlier output of convert_checkpoint.py, and "
                f"{out!r} is not one (no {OUTPUT_MARKER}); remove it yourself or choose "
                "another directory"
            )


class _Staging:
    """A fresh directory beside ``out``; ``commit()`` swaps it into place (an earlier output, checked by
    check_output_dir, is moved aside first and deleted only after the swap), otherwise it is removed."""

    def __init__(self, out: str):
        self.out = os.path.abspath(out)
        parent = os.path.dirname(self.out)
        os.makedirs(parent, exist_ok=True)
        self.path = tempfile.mkdtemp(prefix=".convert-", dir=parent)

    def commit(self) -> None:
        with open(os.path.join(self.path, OUTPUT_MARKER), "w") as f:
            f.write("written by tools/convert_checkpoint.py; --overwrite may replace this directory\n")
        old = None
        if os.path.exists(self.out):
            if os.listdir(self.out) and not os.path.isfile(os.path.join(self.out, OUTPUT_MARKER)):
                raise ConversionError(f"{self.out!r} changed during the conversion; not replacing it")
            old = tempfile.mkdtemp(prefix=".convert-old-", dir=os.path.dirname(self.out))
            os.replace(self.out, os.path.join(old, "out"))
        os.replace(self.path, self.out)
        if old is not None:
            shutil.rmtree(old)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if os.path.exists(self.path):
            shutil.rmtree(self.path, ignore_errors=True)


def check_target_layout(shape, tp: int, pp: int, ep: int) -> None:
    problems = layout_problems(shape, tp, pp, ep, check_vocab=True)
    if problems:
        raise ConversionError(
            "target layout TP {} / PP {} / EP {} does not fit the model: {}".format(tp, pp, ep, "; ".join(problems))
        )


def _function_change_gate(reasons: List[str], allow: bool, log: Log) -> None:
    if not reasons:
        return
    text = (
        "this conversion is NOT function-preserving: the converted model computes a different function "
        "(a warm start, not the same model):\n  - " + "\n  - ".join(reasons)
    )
    if not allow:
        raise ConversionError(text + "\npass --allow-function-change to convert anyway")
    log("WARNING: " + text)


def _sv_overrides(sv_overrides: Optional[Dict]) -> Dict:
    return {k: v for k, v in (sv_overrides or {}).items() if v is not None}


# ----------------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------------
def _export_checks(shape, sv) -> None:
    problems = []
    if shape.normalization != "RMSNorm":
        problems.append(f"normalization {shape.normalization} (Llama/Mixtral use RMSNorm)")
    if not shape.swiglu:
        problems.append("a non-gated MLP (Llama/Mixtral use SwiGLU)")
    if shape.position_embedding_type != "rope":
        problems.append(f"position embeddings {shape.position_embedding_type!r} (Llama/Mixtral use RoPE)")
    if problems:
        raise ConversionError("cannot export to Hugging Face: " + "; ".join(problems))


def export_to_hf(
    load: str,
    out: str,
    *,
    vocab_size: Optional[int] = None,
    overwrite: bool = False,
    dtype: str = "float32",
    max_shard_bytes: int = 2 << 30,
    tokenizer_model: Optional[str] = None,
    with_tokenizer: bool = True,
    log: Log = print,
) -> Dict:
    """``tokenizer_model``: the tokenizer to write beside the model (default: the one the checkpoint was
    trained with); ``with_tokenizer=False`` writes the model alone."""
    check_output_dir(out, overwrite, source=load)
    iteration, args = read_checkpoint_args(load)
    shape, sv = shape_from_args(args), sv_config_from_args(args)
    _export_checks(shape, sv)
    common = load_common_state(load, iteration)
    tokenizer = T.TokenizerSource.from_checkpoint_args(args, tokenizer_model) if with_tokenizer else None
    hf_tokenizer = None
    if tokenizer is not None:
        tokenizer.check()
        hf_tokenizer = T.load_hf_tokenizer(tokenizer)
        if len(hf_tokenizer) > shape.vocab_size:
            raise ConversionError(
                f"vocabulary mismatch: the tokenizer {tokenizer.path!r} has {len(hf_tokenizer)} "
                f"tokens, the checkpoint's embedding {shape.vocab_size} rows"
            )
    true_vocab = (
        vocab_size
        or (common.get("conversion") or {}).get("hf_vocab_size")
        or args.get("vocab_size")
        or (len(hf_tokenizer) if hf_tokenizer is not None else None)
        or shape.vocab_size
    )
    if true_vocab > shape.vocab_size:
        raise ConversionError(
            f"vocabulary mismatch: --vocab-size {true_vocab} exceeds the checkpoint's padded "
            f"vocabulary {shape.vocab_size}"
        )
    if hf_tokenizer is not None and len(hf_tokenizer) > true_vocab:
        raise ConversionError(
            f"vocabulary mismatch: the tokenizer has {len(hf_tokenizer)} tokens, more than the "
            f"exported vocabulary {true_vocab}"
        )
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    custom = sv.has_inner_norms or shape.qk_layernorm or shape.post_sublayer_norm
    kind = (
        "MegatronSVForCausalLM (custom code, trust_remote_code)"
        if custom
        else "MixtralForCausalLM"
        if shape.num_experts
        else "LlamaForCausalLM"
    )
    log(
        f"export: {load} (iteration {iteration}, strategy {args.get('scale_vector_strategy')}: {sv.describe()}) "
        f"-> {out} as {kind}, vocab {true_vocab}, {dtype}"
    )

    model = M.build_model(shape, sv)
    M.load_model_checkpoint(load, model)
    with _Staging(out) as stage:
        w = H.ShardWriter(stage.path, max_shard_bytes, torch_dtype)
        w.add("model.embed_tokens.weight", M.read_embedding(model)[:true_vocab])
        for i, layer in enumerate(M.layers(model)):
            _export_layer(w, f"model.layers.{i}.", M.read_layer(layer, shape), shape, custom)
            w.end_of_layer()
        gamma, weights, _ = C.fold_for_hf(M.read_final(model, shape))
        w.add("model.norm.weight", gamma)
        if shape.untie_embeddings_and_output_weights:
            w.add("lm_head.weight", weights["lm_head"][:true_vocab])
        files = w.close()
        special = {}
        if tokenizer is not None:
            written = T.write_hf_tokenizer(tokenizer, stage.path)
            special = {"bos": written["bos"], "eos": written["eos"]}
        cfg = H.hf_config_dict(shape, true_vocab, args.get("scale_vector_strategy", "standard"), custom, **special)
        if custom:
            cfg["sv_inner_norm"] = sv.has_inner_norms
            H.copy_remote_code(stage.path)
        cfg["torch_dtype"] = dtype
        cfg["megatron_sv"] = {
            "iteration": iteration,
            "strategy": args.get("scale_vector_strategy"),
            "sv": sv.describe(),
            "padded_vocab_size": shape.vocab_size,
        }
        with open(os.path.join(stage.path, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        with open(os.path.join(stage.path, "generation_config.json"), "w") as f:
            json.dump({"_from_model_config": True}, f, indent=2)
        stage.commit()
    log(
        f"export: wrote {len(files)} safetensors file(s) to {out}"
        + (
            f" and the {tokenizer.tokenizer_type} {tokenizer.path} as a Hugging Face tokenizer"
            if tokenizer
            else " (no tokenizer: "
            + ("--no-tokenizer)" if not with_tokenizer else "the checkpoint was trained without one)")
        )
    )
    return {
        "custom_code": custom,
        "files": files,
        "vocab_size": true_vocab,
        "tokenizer": tokenizer.path if tokenizer else None,
    }


def _export_layer(w: H.ShardWriter, p: str, st: LayerState, shape, custom: bool) -> None:
    gamma, weights, inner = C.fold_for_hf(st.attn)
    w.add(p + "input_layernorm.weight", gamma)
    for b in ("q", "k", "v"):
        w.add(f"{p}self_attn.{b}_proj.weight", weights[b])
    for b, u in inner.items():
        w.add(f"{p}self_attn.{b}_proj.out_scale", u)
    if st.q_norm is not None:
        w.add(p + "self_attn.q_proj.qk_norm_weight", st.q_norm)
        w.add(p + "self_attn.k_proj.qk_norm_weight", st.k_norm)
    w.add(p + "self_attn.o_proj.weight", st.o_proj)
    if st.post_attn_norm is not None:
        w.add(p + "post_self_attn_layernorm.weight", st.post_attn_norm)
    gamma, weights, inner = C.fold_for_hf(st.mlp)
    w.add(p + "post_attention_layernorm.weight", gamma)
    if shape.num_experts:
        moe = p + ("mlp." if custom else "block_sparse_moe.")
        w.add(moe + "gate.weight", weights["router"])
        for e in range(shape.num_experts):
            if custom:
                q = f"{moe}experts.{e}."
                w.add(q + "gate_proj.weight", weights[f"e{e}.gate"])
                w.add(q + "up_proj.weight", weights[f"e{e}.up"])
                w.add(q + "down_proj.weight", st.down[e])
                for b in ("gate", "up"):
                    if f"e{e}.{b}" in inner:
                        w.add(f"{q}{b}_proj.out_scale", inner[f"e{e}.{b}"])
            else:
                q = f"{moe}experts.{e}."
                w.add(q + "w1.weight", weights[f"e{e}.gate"])
                w.add(q + "w3.weight", weights[f"e{e}.up"])
                w.add(q + "w2.weight", st.down[e])
    else:
        w.add(p + "mlp.gate_proj.weight", weights["gate"])
        w.add(p + "mlp.up_proj.weight", weights["up"])
        w.add(p + "mlp.down_proj.weight", st.down[0])
        for b, u in inner.items():
            w.add(f"{p}mlp.{b}_proj.out_scale", u)
    if st.post_mlp_norm is not None:
        w.add(p + "post_mlp_layernorm.weight", st.post_mlp_norm)


# ----------------------------------------------------------------------------------------------------
# import
# ----------------------------------------------------------------------------------------------------
def _hf_layer(r: H.SafetensorsReader, hf: H.HFModel, i: int, fused: bool) -> LayerState:
    p = f"model.layers.{i}."
    attn = NormGroup(
        r.get(p + "input_layernorm.weight"),
        {b: Branch(r.get(f"{p}self_attn.{b}_proj.weight")) for b in ("q", "k", "v")},
    )
    if hf.num_experts:
        if fused:
            gate_up, down_all = r.get(p + "mlp.experts.gate_up_proj"), r.get(p + "mlp.experts.down_proj")
            mb = {"router": Branch(r.get(p + "mlp.gate.weight"))}
            down = []
            for e in range(hf.num_experts):
                mb[f"e{e}.gate"] = Branch(gate_up[e, : hf.ffn].clone())
                mb[f"e{e}.up"] = Branch(gate_up[e, hf.ffn :].clone())
                down.append(down_all[e].clone())
        else:
            q = p + "block_sparse_moe."
            mb = {"router": Branch(r.get(q + "gate.weight"))}
            down = []
            for e in range(hf.num_experts):
                mb[f"e{e}.gate"] = Branch(r.get(f"{q}experts.{e}.w1.weight"))
                mb[f"e{e}.up"] = Branch(r.get(f"{q}experts.{e}.w3.weight"))
                down.append(r.get(f"{q}experts.{e}.w2.weight"))
    else:
        mb = {"gate": Branch(r.get(p + "mlp.gate_proj.weight")), "up": Branch(r.get(p + "mlp.up_proj.weight"))}
        down = [r.get(p + "mlp.down_proj.weight")]
    return LayerState(
        attn,
        r.get(p + "self_attn.o_proj.weight"),
        None,
        None,
        None,
        NormGroup(r.get(p + "post_attention_layernorm.weight"), mb),
        down,
        None,
    )


def _retarget_layer(st: LayerState, sv, shape, name: str, reasons: List[str]) -> LayerState:
    attn = C.resolve_group(st.attn, C.attn_target(sv), f"{name}.attention", reasons)
    mlp = C.resolve_group(st.mlp, C.mlp_target(sv, list(st.mlp.branches)), f"{name}.mlp", reasons)
    scale = sv.learnable
    return LayerState(
        attn,
        st.o_proj,
        C.resolve_output_norm(st.q_norm, scale, sv.reparam, f"{name}.q_layernorm") if st.q_norm is not None else None,
        C.resolve_output_norm(st.k_norm, scale, sv.reparam, f"{name}.k_layernorm") if st.k_norm is not None else None,
        C.resolve_output_norm(st.post_attn_norm, scale, sv.reparam, f"{name}.post_attn_norm")
        if st.post_attn_norm is not None
        else None,
        mlp,
        st.down,
        C.resolve_output_norm(st.post_mlp_norm, scale, sv.reparam, f"{name}.post_mlp_norm")
        if st.post_mlp_norm is not None
        else None,
    )


def import_from_hf(
    hf_dir: str,
    out: str,
    *,
    strategy: str = "standard",
    sv_overrides: Optional[Dict] = None,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    seq_length: Optional[int] = None,
    make_vocab_size_divisible_by: int = 128,
    allow_function_change: bool = False,
    overwrite: bool = False,
    log: Log = print,
) -> Dict:
    check_output_dir(out, overwrite, source=hf_dir)
    hf = H.read_hf_config(hf_dir)
    reader = H.SafetensorsReader(hf_dir)
    fused = H.check_hf_tensors(reader, hf, hf_dir)
    overrides = _sv_overrides(sv_overrides)
    sv = strategy_config(strategy, **overrides)
    padded = padded_vocab_size(hf.vocab_size, make_vocab_size_divisible_by, tp)
    shape = H.shape_for(hf, padded, seq_length or min(hf.max_position_embeddings, 4096))
    check_target_layout(shape, tp, pp, ep)
    if hf.tied and not sv.learnable and not bool(torch.all(reader.get("model.norm.weight") == 1)):
        raise ConversionError(
            "strategy 'none' with tied embeddings: the final norm's scale would have to be "
            "folded into the LM head, which is the embedding; pick another strategy"
        )
    reasons = C.strategy_change_reasons(STRATEGIES["standard"], sv, shape)
    _function_change_gate(reasons, allow_function_change, log)
    log(
        f"import: {hf_dir} ({hf.model_type}, {hf.num_layers} layers, vocab {hf.vocab_size} padded to {padded}) -> "
        f"{out} with strategy {strategy} ({sv.describe()}), target TP {tp} / PP {pp} / EP {ep}"
    )

    model = M.build_model(shape, sv)
    wr = M.Writer(model)
    layer_reasons: List[str] = []
    for i, layer in enumerate(M.layers(model)):
        st = _retarget_layer(_hf_layer(reader, hf, i, fused), sv, shape, f"layer {i}", layer_reasons)
        M.write_layer(wr, layer, st, shape, f"decoder.layers.{i}")
    embed = reader.get("model.embed_tokens.weight")
    M.write_embedding(wr, model, M.pad_rows(embed, padded))
    head = embed if hf.tied else reader.get("lm_head.weight")
    final = NormGroup(
        reader.get("model.norm.weight"),
        {"lm_head": Branch(M.pad_rows(head, padded))},
        frozen=("lm_head",) if hf.tied else (),
    )
    M.write_final(wr, model, shape, C.resolve_group(final, C.final_target(sv), "final norm", layer_reasons))
    wr.check_complete()
    args = args_for_model(
        shape,
        strategy,
        overrides,
        dict(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep),
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
    )
    conversion = {
        "source": os.path.abspath(hf_dir),
        "hf_model_type": hf.model_type,
        "hf_vocab_size": hf.vocab_size,
        "function_preserving": not reasons,
    }
    flags = pretrain_flags(args)
    tokenizer_files = T.hf_tokenizer_files(hf_dir)
    if tokenizer_files:  # the flags name the final location; the files are copied into the staging directory
        flags += (
            f" --tokenizer-type HuggingFaceTokenizer --tokenizer-model "
            f"{os.path.join(os.path.abspath(out), T.IMPORTED_TOKENIZER_DIR)}"
        )
    with _Staging(out) as stage:
        M.save_model_checkpoint(
            stage.path, 0, model, {"args": args, "consumed_train_samples": 0, "conversion": conversion}
        )
        if tokenizer_files:
            T.copy_hf_tokenizer(hf_dir, tokenizer_files, stage.path)
        with open(os.path.join(stage.path, "model_flags.txt"), "w") as f:
            f.write(flags + "\n")
        stage.commit()
    tokenizer_note = (
        f"the tokenizer is in {os.path.join(out, T.IMPORTED_TOKENIZER_DIR)}"
        if tokenizer_files
        else f"{hf_dir} has no tokenizer files: a tokenizer with {hf.vocab_size} tokens and "
        f"--make-vocab-size-divisible-by {make_vocab_size_divisible_by} pads to the same {padded}"
    )
    log(
        f"import: saved iteration 0 to {out}; train from it with pretrain_gpt_sv.py --load {out} --finetune "
        f"and the model flags\n  {flags}\n({tokenizer_note})"
    )
    return {
        "padded_vocab_size": padded,
        "function_preserving": not reasons,
        "flags": flags,
        "tokenizer_dir": os.path.join(out, T.IMPORTED_TOKENIZER_DIR) if tokenizer_files else None,
    }


# ----------------------------------------------------------------------------------------------------
# megatron_sv -> megatron_sv
# ----------------------------------------------------------------------------------------------------
def _same_structure(a, b) -> bool:
    keys = ("learnable", "branch_specific", "placement", "reparam")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


def _release(module) -> None:
    """Drop a converted module's tensors (keeps peak memory near one model)."""
    for p in module.parameters():
        p.data = torch.empty(0, dtype=p.dtype)


def convert_megatron(
    load: str,
    out: str,
    *,
    strategy: Optional[str] = None,
    sv_overrides: Optional[Dict] = None,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    make_vocab_size_divisible_by: Optional[int] = None,
    vocab_size: Optional[int] = None,
    allow_function_change: bool = False,
    overwrite: bool = False,
    log: Log = print,
) -> Dict:
    check_output_dir(out, overwrite, source=load)
    iteration, src_args = read_checkpoint_args(load)
    common = load_common_state(load, iteration)
    src_shape, src_sv = shape_from_args(src_args), sv_config_from_args(src_args)
    dst_strategy = strategy or src_args.get("scale_vector_strategy", "standard")
    overrides = _sv_overrides(sv_overrides) if strategy or sv_overrides else sv_overrides_from_args(src_args)
    dst_sv = strategy_config(dst_strategy, **overrides)
    divisible = make_vocab_size_divisible_by or src_args.get("make_vocab_size_divisible_by") or 128
    true_vocab = (
        vocab_size
        or (common.get("conversion") or {}).get("hf_vocab_size")
        or src_args.get("vocab_size")
        or src_shape.vocab_size
    )
    if true_vocab > src_shape.vocab_size:
        raise ConversionError(
            f"vocabulary mismatch: --vocab-size {true_vocab} exceeds the checkpoint's padded "
            f"vocabulary {src_shape.vocab_size}"
        )
    padded = padded_vocab_size(true_vocab, divisible, tp)
    dst_shape = dataclasses.replace(src_shape, vocab_size=padded)
    check_target_layout(dst_shape, tp, pp, ep)
    verbatim = _same_structure(src_sv, dst_sv)
    if not verbatim:
        C.check_normalization_for_moves(src_shape, "changing the scale-vector placement")
    reasons = [] if verbatim else C.strategy_change_reasons(src_sv, dst_sv, src_shape)
    _function_change_gate(reasons, allow_function_change, log)
    log(
        f"convert: {load} (iteration {iteration}, {src_args.get('scale_vector_strategy')}: {src_sv.describe()}) -> "
        f"{out} ({dst_strategy}: {dst_sv.describe()}), target TP {tp} / PP {pp} / EP {ep}, padded vocab {padded}"
        + (" [same vector structure: tensors copied verbatim]" if verbatim else "")
    )

    src = M.build_model(src_shape, src_sv)
    M.load_model_checkpoint(load, src)
    dst = M.build_model(dst_shape, dst_sv)
    wr = M.Writer(dst)
    if verbatim:
        src_params = dict(src.named_parameters())
        for name, p in dst.named_parameters():
            value = src_params[name].detach()
            if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
                value = M.pad_rows(value[:true_vocab], padded)
            wr.tensor(p, value, name)
            src_params[name].data = torch.empty(0)
    else:
        layer_reasons: List[str] = []
        for i, (s_layer, d_layer) in enumerate(zip(M.layers(src), M.layers(dst))):
            st = _retarget_layer(M.read_layer(s_layer, src_shape), dst_sv, dst_shape, f"layer {i}", layer_reasons)
            _release(s_layer)
            M.write_layer(wr, d_layer, st, dst_shape, f"decoder.layers.{i}")
        M.write_embedding(wr, dst, M.pad_rows(M.read_embedding(src)[:true_vocab], padded))
        final = M.read_final(src, src_shape)
        final.branches["lm_head"].weight = M.pad_rows(final.branches["lm_head"].weight[:true_vocab], padded)
        M.write_final(wr, dst, dst_shape, C.resolve_group(final, C.final_target(dst_sv), "final norm", layer_reasons))
    del src
    wr.check_complete()
    layout = dict(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep)
    args = dict(src_args)
    args.update(args_for_model(dst_shape, dst_strategy, overrides, layout, make_vocab_size_divisible_by=divisible))
    conversion = dict(common.get("conversion") or {})
    conversion.update(
        {
            "converted_from": os.path.abspath(load),
            "source_strategy": src_args.get("scale_vector_strategy"),
            "hf_vocab_size": true_vocab,
            "function_preserving": not reasons,
        }
    )
    extra = {"args": args, "conversion": conversion, "consumed_train_samples": common.get("consumed_train_samples", 0)}
    with _Staging(out) as stage:
        M.save_model_checkpoint(stage.path, iteration, dst, extra)
        with open(os.path.join(stage.path, "model_flags.txt"), "w") as f:
            f.write(pretrain_flags(args) + "\n")
        stage.commit()
    log(
        f"convert: saved iteration {iteration} (model weights only; load with --finetune or --no-load-optim) "
        f"to {out}\n  model flags: {pretrain_flags(args)}"
    )
    return {"verbatim": verbatim, "function_preserving": not reasons, "padded_vocab_size": padded}
