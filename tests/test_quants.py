"""Every quant a model profile lists can be planned, and the quants the measured facts and common releases use are
there, each with where its file size comes from (a published page, or `computed` from the tensor layout)."""

from __future__ import annotations

import pytest

from hybridd.node.planning import PlanRequest, make_plan
from hybridd.probe.model_profiles import list_profiles, load_profile

CASES = [(name, quant) for name in list_profiles() for quant in load_profile(name).quants]
GGUF_QUANTS = ("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")
# Models released natively at 4 bits (gpt-oss: MXFP4 experts) have no K-quant releases worth planning.
NATIVE_ONLY = {"gpt-oss-20b", "gpt-oss-120b"}


@pytest.mark.parametrize(("model", "quant"), CASES)
def test_every_listed_quant_can_be_planned(model: str, quant: str) -> None:
    plan = make_plan(PlanRequest(model=model, quant=quant, ctx=4096, hardware="desktop-4090-5070ti"))
    file_bytes = load_profile(model).quants[quant].file_bytes
    assert plan["file_bytes"] == file_bytes
    # the weights llama.cpp loads are the file less its header and tokenizer
    assert plan["weights_bytes"] == pytest.approx(file_bytes, rel=0.02)


@pytest.mark.parametrize("model", list_profiles())
def test_common_quants_are_listed_with_a_source(model: str) -> None:
    quants = load_profile(model).quants
    if model not in NATIVE_ONLY and not model.startswith("qwen2.5"):
        assert set(GGUF_QUANTS) <= set(quants)
    for quant in quants.values():
        assert quant.source.startswith(("https://", "computed")), (model, quant.name, quant.source)


def test_the_quants_the_measured_facts_name_are_there() -> None:
    assert {"Q4_K_M", "IQ4_XS"} <= set(load_profile("qwen3.5-397b-a17b").quants)
    assert "Q8_0" in load_profile("qwen3-coder-30b-a3b").quants
    assert {"Q4_K_M", "Q8_0"} <= set(load_profile("glm-4.7-flash").quants)
