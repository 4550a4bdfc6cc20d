"""`hybridd plan` and POST /hybridd/v1/plan: every profile model on the named hardware and on this machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from hybridd.api.app import make_app
from hybridd.config import Config
from hybridd.node.catalog import Catalog
from hybridd.node.planning import PlanRequest, make_plan
from hybridd.probe.model_profiles import list_profiles

REQUIRED = {"weights_bytes", "kv_bytes", "recurrent_bytes", "compute_bytes", "total_bytes", "ctx", "fits",
            "offload_layers", "devices"}
GIB = 1024**3


def run_plan(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hybridd", "plan", *args], capture_output=True, text=True,
                          timeout=60, env=env)


def test_every_profile_model_is_named() -> None:
    assert set(list_profiles()) >= {
        "glm-4.7-flash", "gpt-oss-120b", "gpt-oss-20b", "qwen3-coder-30b-a3b", "qwen3-coder-next",
        "qwen3.5-397b-a17b", "qwen3.5-122b-a10b", "llama-3.1-70b", "llama-3.1-8b", "gemma-3-27b", "qwen3-32b",
        "llama-3.2-3b", "llama-3.3-70b"}


@pytest.mark.parametrize("hardware", ["desktop-4090-5070ti", "dgx-spark", None])
@pytest.mark.parametrize("model", list_profiles())
def test_full_answer_for_every_profile_model(model: str, hardware: str | None) -> None:
    plan = make_plan(PlanRequest(model=model, ctx=32768, hardware=hardware))
    assert set(plan) >= REQUIRED
    assert plan["weights_bytes"] > GIB and plan["kv_bytes"] > 0 and plan["ctx"] >= 32768
    parts = plan["weights_bytes"] + plan["kv_bytes"] + plan["recurrent_bytes"] + plan["compute_bytes"]
    assert plan["total_bytes"] >= parts
    if hardware == "dgx-spark":
        assert [d["name"] for d in plan["devices"]] == ["NVIDIA GB10"]
    if hardware == "desktop-4090-5070ti":
        assert len(plan["devices"]) == 2
        placed = sum(d["bytes_placed"] for d in plan["devices"])
        assert placed <= 40 * GIB
        # A model that fits is wholly on the GPUs; one that runs only partly says how much lives in RAM.
        if plan["fits"]:
            assert plan["offload_layers"] == 0 and not plan["n_cpu_moe"]
        elif plan["runs"]:
            assert plan["offload_layers"] > 0 or plan["n_cpu_moe"] > 0


def test_known_placements_on_the_desktop() -> None:
    desk = "desktop-4090-5070ti"
    assert make_plan(PlanRequest(model="glm-4.7-flash", ctx=32768, hardware=desk))["fits"]
    assert make_plan(PlanRequest(model="llama-3.1-8b", ctx=32768, hardware=desk))["fits"]
    assert not make_plan(PlanRequest(model="gpt-oss-120b", ctx=32768, hardware=desk))["fits"]
    assert not make_plan(PlanRequest(model="llama-3.1-70b", quant="Q8_0", ctx=8192, hardware=desk))["fits"]
    assert make_plan(PlanRequest(model="gpt-oss-120b", ctx=131072, hardware="dgx-spark"))["fits"]


def test_cli_json_and_table(tmp_path: Path) -> None:
    result = run_plan("glm-4.7-flash", "--ctx", "114688", "--kv-type", "q8_0", "--hardware",
                      "desktop-4090-5070ti", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["ctx"] == 114688 and plan["type_k"] == plan["type_v"] == "q8_0" and plan["fits"]
    # llama.cpp users report ~3.1 GiB of KV for GLM-4.7-Flash Q8_0 at 112k (MLA caches K only).
    assert 2.9 * GIB < plan["kv_bytes"] < 3.3 * GIB
    table = run_plan("gpt-oss-120b", "--hardware", "desktop-4090-5070ti")
    assert table.returncode == 0
    assert "weights" in table.stdout and "KV cache" in table.stdout and "in RAM" in table.stdout


def test_cli_plans_a_gguf_file_on_this_machine(tiny_model: Path) -> None:
    result = run_plan(str(tiny_model), "--ctx", "1024", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["architecture"] == "llama" and plan["ctx"] == 1024
    assert plan["hardware"].startswith("this machine")
    # 2 layers x 1 KV head x 32 dims x (K + V) x 2 bytes x 1024 cells
    assert plan["kv_bytes"] == 2 * 32 * 2 * 2 * 1024


def test_cli_uses_a_configured_models_settings(tmp_path: Path, tiny_model: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[[models]]\nname = "mine"\npath = "{tiny_model}"\nctx = 2048\n'
                      'type_k = "q8_0"\ntype_v = "q8_0"\nflash_attn = true\n')
    plan = json.loads(run_plan("mine", "--config", str(config), "--json").stdout)
    assert (plan["ctx"], plan["type_k"], plan["type_v"]) == (2048, "q8_0", "q8_0")


def test_the_engine_sets_the_logits_rows_the_compute_buffer_holds(tmp_path: Path, gemma_model: Path) -> None:
    # llama-server reserves logits for one output a slot, llama-cpp-python for n_batch (512 a ubatch): on the
    # desktop's GLM-4.7-Flash, the GPU with the output layer holds its layers' working set instead of 512 rows of a
    # 154,880-token vocabulary (306 MiB)
    args = ("glm-4.7-flash", "--hardware", "desktop-4090-5070ti", "--json", "--engine")
    default, server = (json.loads(run_plan(*args, engine).stdout) for engine in ("llama-cpp-python", "llama-server"))
    assert 200 * 2**20 < default["compute_bytes"] - server["compute_bytes"] < (154880 + 2048) * 511 * 4
    assert run_plan("glm-4.7-flash", "--engine", "llama-server").stdout.splitlines()[0].endswith(", llama-server")
    # a configured model plans with the engine it names, whatever --engine (or HYBRIDD_ENGINE) says
    config = tmp_path / "config.toml"
    config.write_text(f'[[models]]\nname = "mine"\npath = "{gemma_model}"\nengine = "llama-server"\n'
                      f'[[models]]\nname = "other"\npath = "{gemma_model}"\n')
    named = json.loads(run_plan("mine", "--config", str(config), "--engine", "llama-cpp-python", "--json").stdout)
    implied = json.loads(run_plan("other", "--config", str(config), "--engine", "llama-server", "--json").stdout)
    assert (named["engine"], implied["engine"], default["engine"]) == ("llama-server", "llama-server",
                                                                       "llama-cpp-python")
    # and its buffers are llama-server's: Gemma 3's 262,144-token logits for one row, not 512
    other = json.loads(run_plan("other", "--config", str(config), "--engine", "llama-cpp-python", "--json").stdout)
    assert 256 * 2**20 < other["compute_bytes"] - named["compute_bytes"] < 512 * 2**20
    # the placement options plan with the same buffers as the table: at 128k on the desktop GLM-4.7-Flash Q8_0
    # keeps 3 layers' experts in RAM under llama-server, 4 under llama-cpp-python
    for engine, n_cpu_moe in (("llama-server", 3), ("llama-cpp-python", 4)):
        plan = json.loads(run_plan("glm-4.7-flash", "--quant", "Q8_0", "--ctx", "131072", "--hardware",
                                   "desktop-4090-5070ti", "--engine", engine, "--json").stdout)
        assert plan["n_cpu_moe"] == n_cpu_moe and [o["n_cpu_moe"] for o in plan["options"]] == [n_cpu_moe]
    # with no --engine (nor HYBRIDD_ENGINE), a configured model plans with the engine `hybridd serve` gives it
    # (no kind named: llama-server, as one is found), a file or a profile with llama-cpp-python's larger buffers
    binary = tmp_path / "llama-server"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    config.write_text(config.read_text() + f'[engine]\nllama_server = "{binary}"\n')
    env = {key: value for key, value in os.environ.items() if key != "HYBRIDD_ENGINE"}
    served = json.loads(run_plan("other", "--config", str(config), "--json", env=env).stdout)
    profile = json.loads(run_plan(*args[:-1], env=env).stdout)
    assert served["engine"] == "llama-server" and profile["engine"] is None
    assert profile["compute_bytes"] == default["compute_bytes"]


@pytest.mark.parametrize(("args", "message"), [
    (["no-such-model"], "is not a GGUF path, a configured model (none) or a model profile"),
    (["glm-4.7-flash", "--hardware", "laptop"], "unknown hardware profile 'laptop' (valid: asus-ascent-gx10"),
    (["glm-4.7-flash", "--kv-type", "q9"], "type_k: unknown cache type 'q9'"),
    (["glm-4.7-flash", "--type-v", "q8_0", "--no-flash-attn"], "needs flash attention"),
])
def test_cli_errors_are_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    result = run_plan(*args)
    assert result.returncode == 1
    assert message in result.stderr and result.stderr.count("\n") == 1


@pytest.fixture
async def api() -> AsyncIterator[str]:
    server = TestServer(make_app(Config(), Catalog(())), host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("/hybridd/v1/plan"))
    await server.close()


async def test_api_answers_the_same_json_as_the_cli(api: str) -> None:
    cli = json.loads(run_plan("qwen3-coder-next", "--ctx", "262144", "--hardware", "dgx-spark", "--engine",
                              "llama-server", "--json").stdout)
    async with aiohttp.ClientSession() as session, session.post(api, json={
            "model": "qwen3-coder-next", "ctx": 262144, "hardware": "dgx-spark", "engine": "llama-server"}) as response:
        assert response.status == 200
        assert await response.json() == cli


@pytest.mark.parametrize(("body", "status", "fragment"), [
    ({"model": "glm-4.7-flash", "colour": 1}, 400, "unknown field 'colour'"),
    ({"ctx": 4096}, 400, "'model' is required"),
    ({"model": "glm-4.7-flash", "ctx": "big"}, 400, "'ctx' must be an integer"),
    ({"model": "glm-4.7-flash", "engine": "vllm"}, 400, "engine"),
    ({"model": "glm-4.7-flash", "train": "lora", "engine": "llama-server"}, 400, "engine: not with train"),
    ({"model": "nope"}, 404, "is not a GGUF path"),
    ({"model": "/etc/passwd.gguf"}, 404, "no GGUF file at"),
])
async def test_api_bad_plan_requests(api: str, body: dict, status: int, fragment: str) -> None:  # type: ignore[type-arg]
    async with aiohttp.ClientSession() as session, session.post(api, json=body) as response:
        assert response.status == status
        assert fragment in (await response.json())["error"]["message"]


@pytest.mark.parametrize(("model", "quant", "ctx", "prompt", "placement"), [
    ("glm-4.7-flash", "Q4_K_M", 32768, None, "local"),  # a 30B MoE that fits stays local even with an idle Spark
    ("qwen3-coder-30b-a3b", "Q4_K_M", 8192, None, "local"),  # context tiering: short context local ...
    ("qwen3-coder-30b-a3b", "Q4_K_M", 262144, 4096, "peer:dgx-spark"),  # ... a 256k engine forwarded
    # ... unless the prompt is already deep: llama.cpp's GB10 sweep falls from 61 tok/s at d0 to 31 at d32768
    # (Qwen3-Coder-30B-A3B Q8_0), so at a 128k-token prompt the desktop's partial offload finishes first
    ("qwen3-coder-30b-a3b", "Q4_K_M", 262144, None, "local-offload"),
    ("gpt-oss-120b", None, 32768, None, "peer:dgx-spark"),  # 59 GiB of MXFP4 belongs on the Spark
    ("llama-3.1-70b", "Q4_K_M", 8192, None, "peer:dgx-spark"),  # fits only with layers in RAM: the Spark is faster
])
def test_plan_with_a_peer_gives_the_placements(model: str, quant: str | None, ctx: int, prompt: int | None,
                                               placement: str) -> None:
    args = [model, "--ctx", str(ctx), "--hardware", "desktop-4090-5070ti", "--peer", "dgx-spark", "--json"]
    args += ["--quant", quant] if quant else []
    result = run_plan(*args, *(["--prompt-tokens", str(prompt)] if prompt else []))
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["placement"] == placement
    by_place = {o["placement"]: o for o in plan["options"]}
    assert set(by_place) >= {"peer:dgx-spark"}
    chosen = by_place[placement]
    assert chosen["feasible"] and chosen["predicted_tok_s"] > 0
    others = [o for o in plan["options"] if o["feasible"] and o is not chosen]
    assert all(chosen["total_s"] <= o["total_s"] * 1.05 for o in others)


def test_plan_text_shows_the_options() -> None:
    result = run_plan("glm-4.7-flash", "--hardware", "desktop-4090-5070ti", "--peer", "dgx-spark")
    assert result.returncode == 0
    assert "placement: local" in result.stdout and "peer:dgx-spark" in result.stdout and "tok/s" in result.stdout


def test_plan_train_qlora_70b_goes_to_the_spark() -> None:
    result = run_plan("llama-3.3-70b", "--train", "qlora", "--hardware", "desktop-4090-5070ti", "--peer", "dgx-spark",
                      "--dataset-tokens", "5000000", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    train = plan["train"]
    assert (train["method"], train["seq"], train["batch"], train["rank"]) == ("qlora", 2048, 1, 16)
    parts = ("weights_bytes", "adapter_bytes", "gradient_bytes", "optimizer_bytes", "activation_bytes",
             "logits_bytes", "overhead_bytes")
    assert train["total_bytes"] == sum(train[p] for p in parts)
    assert 48 * GIB < train["total_bytes"] < 80 * GIB  # "70B QLoRA needs about 48-80 GB"
    assert plan["placement"] == "peer:dgx-spark" and "fits NVIDIA GB10" in plan["placement_reason"]
    local, spark = plan["options"]
    assert local["placement"] == "local" and not local["feasible"] and "never split" in local["why_not"]
    assert spark["placement"] == "peer:dgx-spark" and spark["feasible"] and spark["why_not"] == ""
    assert spark["predicted_train_tok_s"] > 0
    assert spark["predicted_s"] == pytest.approx(5_000_000 / spark["predicted_train_tok_s"], rel=1e-3)


def test_plan_train_text_and_environment() -> None:
    env = {**os.environ, "HYBRIDD_TRAIN": "qlora", "HYBRIDD_SEQ": "4096", "HYBRIDD_PEER": "dgx-spark"}
    result = subprocess.run([sys.executable, "-m", "hybridd", "plan", "llama-3.1-8b", "--hardware",
                             "desktop-4090-5070ti"], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    assert "qlora fine-tune, seq 4096, batch 1, rank 16" in result.stdout
    assert "placement: local" in result.stdout and "optimizer" in result.stdout and "peer:dgx-spark" in result.stdout


def test_plan_train_refuses_an_unknown_method() -> None:
    result = run_plan("llama-3.1-8b", "--train", "dpo")
    assert result.returncode == 2 and "invalid choice: 'dpo'" in result.stderr


async def test_api_plans_training_as_the_cli_does(api: str) -> None:
    cli = json.loads(run_plan("qwen3-32b", "--train", "qlora", "--batch", "2", "--hardware", "desktop-4090-5070ti",
                              "--peer", "dgx-spark", "--json").stdout)
    async with aiohttp.ClientSession() as session, session.post(api, json={
            "model": "qwen3-32b", "train": "qlora", "batch": 2, "hardware": "desktop-4090-5070ti",
            "peers": ["dgx-spark"]}) as response:
        assert response.status == 200
        assert await response.json() == cli
    assert cli["placement"] == "peer:dgx-spark"


def test_prompt_and_max_tokens_set_the_reference_request() -> None:
    args = ["glm-4.7-flash", "--quant", "Q8_0", "--ctx", "65536", "--kv-type", "q8_0", "--hardware",
            "desktop-4090-5070ti", "--json"]
    short = json.loads(run_plan(*args, "--prompt-tokens", "49", "--max-tokens", "512").stdout)
    assert short["reference_request"] == {"prompt_tokens": 49, "max_tokens": 512}
    local = next(o for o in short["options"] if o["placement"] == "local")
    assert local["decode_tok_s_start"] == pytest.approx(109, rel=0.1)  # issue 15's measurement
    deep = json.loads(run_plan(*args, "--prompt-tokens", "60000", "--max-tokens", "4096").stdout)
    far = next(o for o in deep["options"] if o["placement"] == "local")
    assert far["decode_tok_s_mean"] < far["decode_tok_s_start"] < local["decode_tok_s_start"]
    too_long = run_plan(*args, "--prompt-tokens", "65000", "--max-tokens", "1024")
    assert too_long.returncode != 0 and "prompt_tokens + max_tokens" in too_long.stderr
