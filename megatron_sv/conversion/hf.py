"""Hugging Face side: config checks and mapping, safetensors reading (lazy, per tensor) and writing
(one shard per group of layers, with an index), and the export config.json.

Only safetensors are read: ``pytorch_model.bin`` files are pickles and are refused (convert them with a
trusted tool first). Every check here runs before any tensor is converted.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from megatron_sv.conversion.canonical import ConversionError
from megatron_sv.models.gpt.shape import GPTShape

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "mixtral")
REFUSED_MODEL_TYPES = {
    "qwen2": "Qwen2 has biases on q/k/v, which megatron_sv's GPT (add_bias_linear=False, no qkv-bias "
    "switch in GPTShape) cannot hold",
    "qwen2_moe": "Qwen2-MoE has qkv biases and shared experts",
    "qwen3": "Qwen3's per-head QK-norm is not mapped yet",
    "gemma": "Gemma uses (1 + weight) norms and GeLU",
    "gemma2": "Gemma 2 uses soft-capping and (1 + weight) norms",
}
REMOTE_CODE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "remote_code")
REMOTE_CODE_FILES = ("configuration_megatron_sv.py", "modeling_megatron_sv.py")


@dataclass(frozen=True)
class HFModel:
    model_type: str
    config: dict
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn: int
    eps: float
    rope_theta: float
    max_position_embeddings: int
    tied: bool
    num_experts: Optional[int]
    topk: int


def read_hf_config(path: str) -> HFModel:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise ConversionError(f"Hugging Face model directory {path!r} does not exist")
    if not os.path.isfile(cfg_path):
        raise ConversionError(f"{path!r} has no config.json (missing file)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            c = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ConversionError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(c, dict):
        raise ConversionError(f"{cfg_path}: expected a JSON object, found {type(c).__name__}")
    try:
        return _hf_model(c, path)
    except (KeyError, TypeError, ValueError) as e:
        what = f"missing key {e}" if isinstance(e, KeyError) else f"bad value ({e})"
        raise ConversionError(f"{cfg_path}: {what}") from None


def _hf_model(c: dict, path: str) -> HFModel:
    mt = c.get("model_type")
    if mt in REFUSED_MODEL_TYPES:
        raise ConversionError(f"model_type {mt!r} is not supported: {REFUSED_MODEL_TYPES[mt]}")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(f"model_type {mt!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    heads = c["num_attention_heads"]
    hidden = c["hidden_size"]
    head_dim = c.get("head_dim") or hidden // heads
    problems = []
    if c.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {c.get('hidden_act')!r} (only silu / SwiGLU)")
    if c.get("attention_bias") or c.get("mlp_bias"):
        problems.append("attention_bias / mlp_bias (megatron_sv's linears have no biases)")
    if head_dim * heads != hidden:
        problems.append(
            f"head_dim {head_dim} x {heads} heads != hidden_size {hidden} (megatron_sv derives "
            "kv_channels = hidden / heads)"
        )
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in ("default", None):
        problems.append(f"rope type {rope_type!r} (only plain RoPE; no {rope_type} scaling)")
    theta = (rope.get("rope_theta") if isinstance(rope, dict) else None) or c.get("rope_theta") or 10000.0
    if float(theta) != int(theta):
        problems.append(f"rope_theta {theta} (megatron_sv's --rotary-base is an integer)")
    if c.get("partial_rotary_factor", 1.0) != 1.0:
        problems.append("partial_rotary_factor != 1")
    max_pos = int(c.get("max_position_embeddings", 2048))
    window = c.get("sliding_window")
    if window is not None and c.get("use_sliding_window", True) and int(window) < max_pos:
        problems.append(
            f"sliding_window {window} < max_position_embeddings {max_pos} (megatron_sv runs full "
            "causal attention; set sliding_window to null in config.json if sequences never exceed "
            "the window)"
        )
    experts = c.get("num_local_experts") if mt == "mixtral" else None
    if mt == "mixtral" and c.get("router_jitter_noise", 0.0):
        problems.append("router_jitter_noise != 0")
    if problems:
        raise ConversionError(f"{path}: unsupported {mt} configuration:\n  " + "\n  ".join(problems))
    return HFModel(
        mt,
        c,
        int(c["vocab_size"]),
        hidden,
        int(c["num_hidden_layers"]),
        heads,
        int(c.get("num_key_value_heads") or heads),
        head_dim,
        int(c["intermediate_size"]),
        float(c.get("rms_norm_eps", 1e-6)),
        float(theta),
        max_pos,
        bool(c.get("tie_word_embeddings", False)),
        experts,
        int(c.get("num_experts_per_tok", 2)),
    )


def shape_for(hf: HFModel, padded_vocab: int, seq_length: int) -> GPTShape:
    return GPTShape(
        num_layers=hf.num_layers,
        hidden_size=hf.hidden_size,
        num_attention_heads=hf.num_heads,
        vocab_size=padded_vocab,
        seq_length=seq_length,
        ffn_hidden_size=hf.ffn,
        num_query_groups=hf.num_kv_heads if hf.num_kv_heads != hf.num_heads else None,
        max_position_embeddings=hf.max_position_embeddings,
        normalization="RMSNorm",
        norm_epsilon=hf.eps,
        swiglu=True,
        position_embedding_type="rope",
        rotary_base=int(hf.rope_theta),
        untie_embeddings_and_output_weights=not hf.tied,
        num_experts=hf.num_experts,
        moe_router_topk=hf.topk,
        moe_ffn_hidden_size=hf.ffn if hf.num_experts else None,
    )


# ----------------------------------------------------------------------------------------------------
# reading safetensors
# ----------------------------------------------------------------------------------------------------
class SafetensorsReader:
    """Lazy access to the tensors of a Hugging Face model directory (single file or sharded + index)."""

    def __init__(self, path: str):
        from safetensors import safe_open  # noqa: PLC0415 - the [hf] extra, only for Hugging Face files

        single = os.path.join(path, "model.safetensors")
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        elif os.path.isfile(single):
            weight_map = None
        else:
            pickles = [n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth"))]
            hint = (
                (
                    f" (found {pickles[0]}: pickle files are never loaded; convert them to safetensors with a "
                    "trusted tool first)"
                )
                if pickles
                else ""
            )
            raise ConversionError(
                f"{path!r} has no model.safetensors or model.safetensors.index.json (missing file){hint}"
            )
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        for name in files:
            if not os.path.isfile(os.path.join(path, name)):
                raise ConversionError(f"{path!r}: shard {name} named by the index is missing (missing file)")
        self._handles = {}
        for n in files:
            try:
                self._handles[n] = safe_open(os.path.join(path, n), framework="pt")
            except Exception as e:  # noqa: BLE001 - safetensors' own error types: one line naming the file
                raise ConversionError(
                    f"{os.path.join(path, n)}: not a readable safetensors file ({e}); truncated or corrupt"
                ) from None
        self._path = path
        self._where: Dict[str, str] = {}
        for n, h in self._handles.items():
            for k in h.keys():
                self._where[k] = n
        if weight_map:
            missing = [k for k in weight_map if k not in self._where]
            if missing:
                raise ConversionError(
                    f"{path!r}: tensors named by the index are missing from the shards: {missing[:3]}"
                )

    def keys(self):
        return self._where.keys()

    def shape(self, key: str) -> Tuple[int, ...]:
        return tuple(self._handles[self._where[key]].get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        """The tensor in fp32; refuses unreadable data and non-finite values (which would train as NaN)."""
        file = os.path.join(self._path, self._where[key])
        try:
            t = self._handles[self._where[key]].get_tensor(key).float()
        except Exception as e:  # noqa: BLE001
            raise ConversionError(f"{file}: tensor {key} is unreadable ({e}); truncated or corrupt") from None
        if not bool(torch.isfinite(t).all()):
            raise ConversionError(f"{file}: tensor {key} has non-finite values (NaN or inf); refusing to import it")
        return t


def expected_hf_tensors(hf: HFModel, fused_experts: bool) -> Dict[str, Tuple[int, ...]]:
    h, nh, nkv, hd, f, v = hf.hidden_size, hf.num_heads, hf.num_kv_heads, hf.head_dim, hf.ffn, hf.vocab_size
    out = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not hf.tied:
        out["lm_head.weight"] = (v, h)
    for i in range(hf.num_layers):
        p = f"model.layers.{i}."
        out.update(
            {
                p + "self_attn.q_proj.weight": (nh * hd, h),
                p + "self_attn.k_proj.weight": (nkv * hd, h),
                p + "self_attn.v_proj.weight": (nkv * hd, h),
                p + "self_attn.o_proj.weight": (h, nh * hd),
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
            }
        )
        if hf.num_experts:
            E = hf.num_experts
            if fused_experts:
                out[p + "mlp.gate.weight"] = (E, h)
                out[p + "mlp.experts.gate_up_proj"] = (E, 2 * f, h)
                out[p + "mlp.experts.down_proj"] = (E, h, f)
            else:
                out[p + "block_sparse_moe.gate.weight"] = (E, h)
                for e in range(E):
                    q = f"{p}block_sparse_moe.experts.{e}."
                    out.update({q + "w1.weight": (f, h), q + "w3.weight": (f, h), q + "w2.weight": (h, f)})
        else:
            out.update(
                {
                    p + "mlp.gate_proj.weight": (f, h),
                    p + "mlp.up_proj.weight": (f, h),
                    p + "mlp.down_proj.weight": (h, f),
                }
            )
    return out


def check_hf_tensors(reader: SafetensorsReader, hf: HFModel, path: str) -> bool:
    """Every expected tensor is present with the expected shape (vocabulary included). Returns whether the
    experts use transformers 5's fused layout."""
    fused = any(k.endswith("mlp.experts.gate_up_proj") for k in reader.keys())
    expected = expected_hf_tensors(hf, fused)
    missing = [k for k in expected if k not in reader.keys()]
    if missing:
        raise ConversionError(f"{path}: {len(missing)} expected tensors are missing, e.g. {missing[:3]}")
    bad = []
    for k, shp in expected.items():
        got = reader.shape(k)
        if got != shp:
            bad.append(f"{k}: {got}, config.json implies {shp}")
    if bad:
        vocab = [b for b in bad if "embed_tokens" in b or "lm_head" in b]
        head = (
            f"vocabulary mismatch: config.json vocab_size {hf.vocab_size} does not match the embedding/"
            f"LM-head tensors\n  "
            if vocab
            else "tensor shapes do not match config.json:\n  "
        )
        raise ConversionError(f"{path}: " + head + "\n  ".join(bad[:6]))
    extra = [k for k in reader.keys() if k not in expected and not k.endswith("rotary_emb.inv_freq")]
    if extra:
        raise ConversionError(
            f"{path}: unexpected tensors (an architecture variant this converter does not know): {extra[:4]}"
        )
    return fused


# ----------------------------------------------------------------------------------------------------
# writing safetensors
# ----------------------------------------------------------------------------------------------------
class ShardWriter:
    """Writes tensors in shards of at most ``max_shard_bytes`` (flushed between layers), then an index."""

    def __init__(self, out_dir: str, max_shard_bytes: int = 2 << 30, dtype: torch.dtype = torch.float32):
        self.out_dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        self.dtype = dtype
        self.pending: Dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: List[Tuple[str, List[str]]] = []
        self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        t = t.detach().to(self.dtype).contiguous().clone()
        self.pending[name] = t
        self.pending_bytes += t.numel() * t.element_size()

    def end_of_layer(self) -> None:
        if self.pending_bytes >= self.max_shard_bytes:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file  # noqa: PLC0415 - the [hf] extra, only for Hugging Face files

        if not self.pending:
            return
        name = f"part-{len(self.files):05d}.safetensors"
        save_file(self.pending, os.path.join(self.out_dir, name), metadata={"format": "pt"})
        self.files.append((name, list(self.pending)))
        self.total += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> List[str]:
        self.flush()
        n = len(self.files)
        weight_map = {}
        final_names = []
        for i, (tmp, keys) in enumerate(self.files):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(self.out_dir, tmp), os.path.join(self.out_dir, final))
            final_names.append(final)
            weight_map.update({k: final for k in keys})
        if n > 1:
            with open(os.path.join(self.out_dir, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": self.total}, "weight_map": weight_map}, f, indent=2)
        return final_names


def hf_config_dict(
    shape, vocab_size: int, strategy: str, custom: bool, bos: Optional[int] = None, eos: Optional[int] = None
) -> dict:
    nh = shape.num_attention_heads
    cfg = {
        "vocab_size": vocab_size,
        "hidden_size": shape.hidden_size,
        "intermediate_size": (shape.moe_ffn_hidden_size or shape.resolved_ffn_hidden_size())
        if shape.num_experts
        else shape.resolved_ffn_hidden_size(),
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": nh,
        "num_key_value_heads": shape.num_query_groups or nh,
        "head_dim": shape.hidden_size // nh,
        "hidden_act": "silu",
        "max_position_embeddings": shape.max_position_embeddings or shape.seq_length,
        "rms_norm_eps": shape.norm_epsilon,
        "tie_word_embeddings": not shape.untie_embeddings_and_output_weights,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(shape.rotary_base)},
        "rope_theta": float(shape.rotary_base),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": shape.init_method_std,
        "use_cache": True,
        "torch_dtype": "float32",
        "bos_token_id": bos,
        "eos_token_id": eos,
    }
    if custom:
        cfg.update(
            model_type="megatron_sv",
            architectures=["MegatronSVForCausalLM"],
            auto_map={
                "AutoConfig": "configuration_megatron_sv.MegatronSVConfig",
                "AutoModelForCausalLM": "modeling_megatron_sv.MegatronSVForCausalLM",
            },
            sv_inner_norm=False,
            qk_norm=shape.qk_layernorm,
            post_sublayer_norm=shape.post_sublayer_norm,
            num_local_experts=shape.num_experts,
            num_experts_per_tok=shape.moe_router_topk,
            sv_strategy=strategy,
            mlp_bias=False,
        )
    elif shape.num_experts:
        cfg.update(
            model_type="mixtral",
            architectures=["MixtralForCausalLM"],
            num_local_experts=shape.num_experts,
            num_experts_per_tok=shape.moe_router_topk,
            router_jitter_noise=0.0,
            output_router_logits=False,
            sliding_window=None,
        )
    else:
        cfg.update(model_type="llama", architectures=["LlamaForCausalLM"], mlp_bias=False, pretraining_tp=1)
    return cfg


def copy_remote_code(out_dir: str) -> None:
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(os.path.join(REMOTE_CODE_DIR, name), os.path.join(out_dir, name))
