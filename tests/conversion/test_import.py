"""Import parity (HF -> megatron_sv gives the HF logits for every foldable strategy; dnp/unified only
with --allow-function-change), layout independence of the converted checkpoint (loaded at TP2, PP2,
EP2), the HF -> unified -> HF round trip, megatron -> megatron re-parameterization and the error cases."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from tests.conversion.helpers import FOLDABLE, all_layout_logits, hf_logits, megatron_logits_single, tiny_hf
from tests.helpers.distributed import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUIET = dict(log=lambda s: None)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    out = {}
    for kind in ("llama", "mistral", "mixtral"):
        path = str(tmp_path_factory.mktemp(kind))
        model = tiny_hf(kind, path)
        out[kind] = (path, hf_logits(model, 100))
    return out


@pytest.fixture(scope="module")
def imported(hf_models, single_process, tmp_path_factory):
    from megatron_sv.conversion import import_from_hf

    out = {}
    for kind in ("llama", "mixtral"):
        for strategy in FOLDABLE:
            root = str(tmp_path_factory.mktemp(f"{kind}-{strategy}"))
            import_from_hf(hf_models[kind][0], root, strategy=strategy, seq_length=16, overwrite=True, **QUIET)
            out[(kind, strategy)] = root
    return out


@pytest.mark.parametrize("kind", ["llama", "mixtral"])
@pytest.mark.parametrize("strategy", FOLDABLE)
def test_import_parity(hf_models, imported, kind, strategy):
    ref = hf_models[kind][1]
    got = megatron_logits_single(imported[(kind, strategy)], 100)
    assert ref.abs().max() > 0.1
    assert (got - ref).abs().max().item() <= 1e-4


def test_import_mistral_parity(hf_models, single_process, tmp_path):
    from megatron_sv.conversion import import_from_hf

    import_from_hf(hf_models["mistral"][0], str(tmp_path / "m"), strategy="hg", seq_length=16, **QUIET)
    assert (megatron_logits_single(str(tmp_path / "m"), 100) - hf_models["mistral"][1]).abs().max() <= 1e-4


LAYOUTS = {"tp2": (2, 1, 1), "pp2": (1, 2, 1), "ep2": (1, 1, 2)}


@pytest.fixture(scope="module")
def other_layouts(imported):
    todo = []
    for key, (tp, pp, ep) in LAYOUTS.items():
        kinds = ["mixtral"] if ep > 1 else ["llama", "mixtral"]
        todo.append((key, tp, pp, ep, {f"{k}-{s}": imported[(k, s)] for k in kinds for s in ("hg", "dp", "er")}))
    return run_distributed(all_layout_logits, world_size=2, args=(todo, 100), timeout=600)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_imported_checkpoint_loads_at_other_layouts(hf_models, other_layouts, layout):
    """A checkpoint written by the single-process converter (TP1/PP1/EP1) loads at any layout."""
    for name, logits in other_layouts[-1][layout].items():
        ref = hf_models[name.split("-")[0]][1]
        assert (logits - ref).abs().max().item() <= 1e-4, name


@pytest.mark.parametrize("strategy", ["dnp", "unified"])
def test_import_into_inner_norms_needs_flag(hf_models, single_process, tmp_path, strategy):
    from megatron_sv.conversion import ConversionError, import_from_hf

    out = str(tmp_path / "o")
    with pytest.raises(ConversionError, match="(?s)NOT function-preserving.*--allow-function-change"):
        import_from_hf(hf_models["llama"][0], out, strategy=strategy, seq_length=16, **QUIET)
    assert not os.path.exists(out)
    messages = []
    report = import_from_hf(
        hf_models["llama"][0], out, strategy=strategy, seq_length=16, allow_function_change=True, log=messages.append
    )
    assert not report["function_preserving"]
    assert any(m.startswith("WARNING") and "warm start" in m for m in messages)
    got = megatron_logits_single(out, 100)
    assert torch.isfinite(got).all()
    assert (got - hf_models["llama"][1]).abs().max() > 1e-2  # a warm start, not the same function


def _tensors(path):
    out = {}
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), "pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


# the HF linear maps fed by each norm, and whether unified puts an inner norm N_b after them
_ATTN_NORM, _MLP_NORM = "input_layernorm", "post_attention_layernorm"
_FED = (
    ("q_proj", _ATTN_NORM, True),
    ("k_proj", _ATTN_NORM, True),
    ("v_proj", _ATTN_NORM, False),
    ("gate_proj", _MLP_NORM, True),
    ("up_proj", _MLP_NORM, True),
    ("mlp.gate.", _MLP_NORM, False),
)


@pytest.mark.parametrize("kind", ["llama", "mixtral"])
def test_round_trip_through_unified(hf_models, single_process, tmp_path, kind):
    """HF -> unified -> HF. Import starts every branch vector from the pre-norm gamma. Under unified the
    input vectors of q, k, gate and up are direction-only (their inner norm N_b removes any magnitude), so
    they keep gamma / rms(gamma): what comes back is, per linear map fed by a norm, the same effective map
    W diag(gamma) (divided by rms(gamma) before an inner norm, which normalizes it away), whichever of norm
    and weight the exporter puts it in; every other tensor (embeddings, o, down, the final norm, lm_head)
    comes back bit for bit or up to fp32 rounding; the only extra tensors are the inner-norm output scales
    u, equal to 1."""
    from megatron_sv.conversion import export_to_hf, import_from_hf

    src = hf_models[kind][0]
    import_from_hf(src, str(tmp_path / "u"), strategy="unified", seq_length=16, allow_function_change=True, **QUIET)
    export_to_hf(str(tmp_path / "u"), str(tmp_path / "hf"), **QUIET)
    a, b = _tensors(src), _tensors(str(tmp_path / "hf"))
    assert json.load(open(tmp_path / "hf" / "config.json"))["vocab_size"] == 100
    renamed = {
        k.replace("block_sparse_moe.experts.", "mlp.experts.")
        .replace("block_sparse_moe.gate", "mlp.gate")
        .replace(".w1.", ".gate_proj.")
        .replace(".w3.", ".up_proj.")
        .replace(".w2.", ".down_proj."): k
        for k in a
    }
    assert set(renamed) <= set(b)
    extra = set(b) - set(renamed)
    assert extra and all(k.endswith("out_scale") for k in extra)
    for k in extra:
        assert torch.equal(b[k], torch.ones_like(b[k])), k
    checked = 0
    for new_name, old_name in renamed.items():
        layer = new_name.split(".mlp.")[0].split(".self_attn.")[0]
        fed = [(norm, inner) for part, norm, inner in _FED if part in new_name and new_name.endswith("weight")]
        if fed and "layers." in new_name:
            norm, inner = fed[0]
            g_old, g_new = (
                a[renamed.get(f"{layer}.{norm}.weight", f"{layer}.{norm}.weight")],
                b[f"{layer}.{norm}.weight"],
            )
            want = a[old_name] * g_old / (g_old.square().mean().sqrt() if inner else 1.0)
            torch.testing.assert_close(b[new_name] * g_new, want, rtol=1e-5, atol=1e-7, msg=new_name)
            checked += 1
        elif "layernorm" in new_name and "layers." in new_name:
            continue  # compared through the maps it feeds
        elif "norm" in new_name:
            torch.testing.assert_close(b[new_name], a[old_name], rtol=1e-6, atol=1e-6, msg=new_name)
        else:
            torch.testing.assert_close(b[new_name], a[old_name], rtol=0, atol=0, msg=new_name)
    assert checked >= 5


def test_round_trip_standard_is_exact(hf_models, imported):
    from megatron_sv.conversion import export_to_hf

    out = os.path.join(os.path.dirname(imported[("llama", "standard")]), "rt-standard")
    export_to_hf(imported[("llama", "standard")], out, overwrite=True, **QUIET)
    a, b = _tensors(hf_models["llama"][0]), _tensors(out)
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("target", ["hg", "dp", "or", "er", "none", "standard"])
def test_reparameterize_is_function_preserving(hf_models, imported, single_process, tmp_path, target):
    from megatron_sv.conversion import convert_megatron

    # from standard and from dp (whose vectors differ per branch after import into hg/dp... and are then re-set)
    for source in ("standard", "dp", "er"):
        out = str(tmp_path / f"{source}-{target}")
        report = convert_megatron(imported[("mixtral", source)], out, strategy=target, **QUIET)
        assert report["function_preserving"]
        got = megatron_logits_single(out, 100)
        assert (got - hf_models["mixtral"][1]).abs().max().item() <= 1e-4, (source, target)


def test_reshard_same_strategy_is_verbatim_and_repads_vocab(imported, single_process, tmp_path):
    from megatron_sv.checkpointing.model_io import read_checkpoint_args
    from megatron_sv.conversion import convert_megatron

    out = str(tmp_path / "tp3")
    report = convert_megatron(imported[("llama", "or")], out, tp=2, make_vocab_size_divisible_by=96, **QUIET)
    assert report["verbatim"] and report["padded_vocab_size"] == 192
    _, args = read_checkpoint_args(out)
    assert args["tensor_model_parallel_size"] == 2 and args["padded_vocab_size"] == 192
    assert (megatron_logits_single(out, 100) - megatron_logits_single(imported[("llama", "or")], 100)).abs().max() == 0


def test_reparameterize_into_unified_needs_flag(imported, single_process, tmp_path):
    from megatron_sv.conversion import ConversionError, convert_megatron

    with pytest.raises(ConversionError, match="--allow-function-change"):
        convert_megatron(imported[("llama", "standard")], str(tmp_path / "u"), strategy="unified", **QUIET)
    report = convert_megatron(
        imported[("llama", "standard")], str(tmp_path / "u"), strategy="unified", allow_function_change=True, **QUIET
    )
    assert not report["function_preserving"]


# ------------------------------------------------------------------------------------------ errors
def _cli(*args):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _write_config(path, **changes):
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg.update(changes)
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))


def test_error_unsupported_architecture(hf_models, tmp_path):
    import shutil

    from megatron_sv.conversion import ConversionError, import_from_hf

    for model_type, pattern in (("qwen2", "qkv biases|biases on q/k/v"), ("gpt2", "not supported; supported: llama")):
        src = str(tmp_path / model_type)
        shutil.copytree(hf_models["llama"][0], src)
        _write_config(src, model_type=model_type)
        with pytest.raises(ConversionError, match=pattern):
            import_from_hf(src, str(tmp_path / "o"), **QUIET)
    src = str(tmp_path / "rope")
    shutil.copytree(hf_models["llama"][0], src)
    _write_config(src, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0})
    r = _cli("import", "--hf-dir", src, "--save", str(tmp_path / "o2"))
    assert r.returncode == 2 and "rope type 'yarn'" in r.stderr and not os.path.exists(tmp_path / "o2")


def test_error_non_empty_output_dir(hf_models, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    r = _cli("import", "--hf-dir", hf_models["llama"][0], "--save", str(out), "--seq-length", "16")
    assert r.returncode == 2 and "not empty; pass --overwrite" in r.stderr
    assert (out / "keep.txt").read_text() == "x"
    # --overwrite replaces only an earlier output of the tool (tests/conversion/test_overwrite_safety.py)
    r = _cli("import", "--hf-dir", hf_models["llama"][0], "--save", str(out), "--seq-length", "16", "--overwrite")
    assert r.returncode == 2 and "is not one" in r.stderr, r.stderr[-2000:]
    assert (out / "keep.txt").read_text() == "x"


def test_error_missing_files(hf_models, tmp_path):
    import shutil

    from megatron_sv.conversion import ConversionError, export_to_hf, import_from_hf

    src = str(tmp_path / "nosafe")
    shutil.copytree(hf_models["llama"][0], src)
    os.rename(os.path.join(src, "model.safetensors"), os.path.join(src, "pytorch_model.bin"))
    with pytest.raises(ConversionError, match="missing file.*pickle files are never loaded"):
        import_from_hf(src, str(tmp_path / "o"), **QUIET)
    os.remove(os.path.join(src, "config.json"))
    with pytest.raises(ConversionError, match="no config.json"):
        import_from_hf(src, str(tmp_path / "o"), **QUIET)
    from megatron_sv.checkpointing import CheckpointError

    (tmp_path / "not_a_checkpoint").mkdir()
    with pytest.raises(CheckpointError, match="latest_checkpointed_iteration"):
        export_to_hf(str(tmp_path / "not_a_checkpoint"), str(tmp_path / "o"), **QUIET)


def test_error_vocab_mismatch(hf_models, imported, tmp_path):
    import shutil

    from megatron_sv.conversion import ConversionError, export_to_hf, import_from_hf

    src = str(tmp_path / "vocab")
    shutil.copytree(hf_models["llama"][0], src)
    _write_config(src, vocab_size=120)
    with pytest.raises(ConversionError, match="vocabulary mismatch"):
        import_from_hf(src, str(tmp_path / "o"), **QUIET)
    with pytest.raises(ConversionError, match="vocabulary mismatch"):
        export_to_hf(imported[("llama", "hg")], str(tmp_path / "o"), vocab_size=1000, **QUIET)
    assert not os.path.exists(tmp_path / "o")
