"""Export parity: a megatron_sv checkpoint made at TP2 or PP2 with scale vectors perturbed away from 1,
exported to Hugging Face, gives the same logits (fp32, max abs diff <= 1e-4) in `transformers`, for
every strategy, dense and MoE. Foldable strategies must come out as stock Llama / Mixtral."""

import json
import os

import pytest

from tests.conversion.helpers import STRATEGIES, hf_logits, load_hf, make_all_sources
from tests.helpers.distributed import run_distributed

SOURCES = {"tp2-dense": (2, 1, False), "pp2-dense": (1, 2, False), "tp2-moe": (2, 1, True), "pp2-moe": (1, 2, True)}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    roots = {key: str(tmp_path_factory.mktemp(key)) for key in SOURCES}
    todo = [(key, *SOURCES[key], roots[key]) for key in SOURCES]
    results = run_distributed(make_all_sources, world_size=2, args=(todo,), timeout=600)
    # the last rank holds full logits at TP2 and is the last stage at PP2
    made = {key: (roots[key], results[-1][key]) for key in SOURCES}
    return made.__getitem__


@pytest.mark.parametrize("key", list(SOURCES))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_export_parity(sources, single_process, tmp_path, key, strategy):
    from megatron_sv.conversion import export_to_hf

    root, logits = sources(key)
    after, before, count = logits[strategy]
    if strategy != "none":
        assert count > 0
        # the vectors really moved the function, so the comparison below exercises folding
        assert (after - before).abs().max() > 1e-2
    out = str(tmp_path / "hf")
    report = export_to_hf(os.path.join(root, strategy), out, log=lambda s: None)
    cfg = json.load(open(os.path.join(out, "config.json")))
    model = load_hf(out)
    moe = SOURCES[key][2]
    if strategy in ("dnp", "unified"):
        assert report["custom_code"] and cfg["auto_map"] and type(model).__name__ == "MegatronSVForCausalLM"
        assert os.path.isfile(os.path.join(out, "modeling_megatron_sv.py"))
    else:
        assert not report["custom_code"] and "auto_map" not in cfg
        assert type(model).__name__ == ("MixtralForCausalLM" if moe else "LlamaForCausalLM")
    got = hf_logits(model, 128)
    assert after.abs().max() > 0.1
    diff = (got - after).abs().max().item()
    assert diff <= 1e-4, f"{key} {strategy}: max abs diff {diff}"
