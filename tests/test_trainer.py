"""The built-in trainer, run for real on CPU over the tiny Llama: events, resume, cancel, GGUF export into llama.cpp."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hybridd.demo.tiny_hf import write_tiny_llama_pair
from hybridd.jobs import gguf_export

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
       "PYTHONWARNINGS": "ignore"}
ANSWERS = ("hello there", "the answer is 42", "yes, of course", "no thanks")
PROMPT_MESSAGES = [{"role": "user", "content": "question 3?"}, {"role": "assistant", "content": ANSWERS[3]}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_tiny_llama_pair(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def train_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"question {i}?"},
                          {"role": "assistant", "content": ANSWERS[i % 4]}]} for i in range(16)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_spec(folder: Path, base: Path, train: Path, **overrides: Any) -> Path:
    out = folder / "out"
    spec: dict[str, Any] = {
        "version": 1, "job_id": "ftjob-test", "base_model_dir": str(base), "training_file": str(train),
        "validation_file": None, "method": "lora",
        "hyperparameters": {"n_epochs": 3, "batch_size": 1, "learning_rate": 0.02, "max_steps": 20},
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": None},
        "seed": 42, "max_seq": 256, "output_dir": str(out), "resume_from": None, "checkpoint_every": 10,
        "events_path": str(out / "events.jsonl"),
    }
    spec.update(overrides)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def start(spec: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "hybridd.jobs.hf_trainer", str(spec)], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def read_events(spec: Path) -> list[dict[str, Any]]:
    path = Path(json.loads(spec.read_text())["events_path"])
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def wait_event(spec: Path, proc: subprocess.Popen[bytes], kind: str, deadline_s: float = 60.0) -> dict[str, Any]:
    """Poll the events file until an event of `kind` appears; fail if the process ends first or time runs out."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        for event in read_events(spec):
            if event["type"] == kind:
                return event
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited {proc.returncode} before a {kind} event: {read_events(spec)}")
        time.sleep(0.005)
    raise AssertionError(f"no {kind} event within {deadline_s}s")


def run(spec: Path, timeout: float = 120.0) -> tuple[int, list[dict[str, Any]], str]:
    proc = start(spec)
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        kill_group(proc)
    return proc.returncode, read_events(spec), err.decode(errors="replace")


def losses(events: list[dict[str, Any]]) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in events if e["type"] == "metrics"}


@pytest.fixture(scope="module")
def lora_run(tiny: tuple[Path, Path], train_file: Path,
             tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    spec = make_spec(tmp_path_factory.mktemp("lora"), tiny[0], train_file, validation_file=str(train_file))
    code, events, err = run(spec)
    assert code == 0, (events, err)
    return spec, events


def hf_reference(hf_dir: Path, adapter_dir: Path | None, text: str) -> tuple[list[int], np.ndarray, np.ndarray | None]:
    """HF's token ids for text, its base logits, and with adapter_dir its base + PEFT logits (in a subprocess)."""
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "hf_reference.py"), str(hf_dir),
                             str(adapter_dir) if adapter_dir else "-", text],
                            capture_output=True, text=True, env=ENV, check=True, timeout=120)
    answer = json.loads(result.stdout)
    tuned = np.array(answer["logits"], dtype=np.float32) if "logits" in answer else None
    return answer["ids"], np.array(answer["base_logits"], dtype=np.float32), tuned


def llama_logits(gguf_path: Path, ids: list[int], lora: Path | None = None) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf_path), lora_path=str(lora) if lora else None, logits_all=True,
                          n_ctx=256, n_threads=1, verbose=False)
    try:
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)], dtype=np.float32)
    finally:
        llm.close()


def llama_cpp_ids(gguf_path: Path, text: str) -> list[int]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=256, vocab_only=True, verbose=False)
    try:
        return list(llm.tokenize(text.encode(), add_bos=True, special=True))
    finally:
        llm.close()


def chat_text(hf_dir: Path) -> str:
    template = json.loads((hf_dir / "tokenizer_config.json").read_text())["chat_template"]
    import jinja2

    return str(jinja2.Template(template).render(messages=PROMPT_MESSAGES, add_generation_prompt=False))


# ---- the tiny fixture ----

def test_tiny_pair_tokenizes_like_hf(tiny: tuple[Path, Path]) -> None:
    from tokenizers import Tokenizer  # what transformers' fast tokenizer runs; its import needs no torch

    hf_dir, gguf_path = tiny
    text = chat_text(hf_dir) + "The weather's fine; isn't it? 123 -- {'a': [1, 2]}\t~"
    ids = Tokenizer.from_file(str(hf_dir / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    assert llama_cpp_ids(gguf_path, text) == ids
    assert 256 in ids and 258 in ids  # the one merge, "he", and <|im_start|>


def test_sentencepiece_style_tokenizers_export_with_scores_and_space_prefix(tmp_path: Path) -> None:
    import gguf
    from tokenizers import Tokenizer

    from hybridd.demo.tiny_hf import TinyHfLlama

    hf_dir, gguf_path = write_tiny_llama_pair(tmp_path, TinyHfLlama(tokenizer="spm"))
    tokenizer = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    for text in ("hello the world", "  two  spaces and\ttab\nnewline", "Hello there, the hello! ~{x}",
                 chat_text(hf_dir)):
        assert llama_cpp_ids(gguf_path, text) == tokenizer.encode(text, add_special_tokens=False).ids, text
    fields = {name: field.contents() for name, field in gguf.GGUFReader(gguf_path).fields.items()}
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.add_space_prefix"] is True
    assert fields["tokenizer.ggml.tokens"][265] == "\u2581the" and fields["tokenizer.ggml.scores"][265] == -2.0


def test_tiny_checkpoint_is_cheap_to_build(tmp_path: Path) -> None:
    began = time.monotonic()
    hf_dir, gguf_path = write_tiny_llama_pair(tmp_path)
    assert time.monotonic() - began < 2.0
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in hf_dir.iterdir()}
    assert gguf_path.stat().st_size > 0


# ---- LoRA training end to end ----

def test_lora_run_writes_events_in_order_and_an_adapter_llama_cpp_loads(
        lora_run: tuple[Path, list[dict[str, Any]]], tiny: tuple[Path, Path]) -> None:
    _, events = lora_run
    kinds = [e["type"] for e in events]
    assert kinds[0] == "message" and kinds[-1] == "result"
    assert all("time" in e for e in events)
    metrics = [e for e in events if e["type"] == "metrics"]
    assert [m["step"] for m in metrics] == list(range(1, 21))
    assert all(m["total_steps"] == 20 for m in metrics)
    assert {"loss", "learning_rate", "tokens_per_s", "trained_tokens", "epoch"} <= set(metrics[0])
    assert "valid_loss" in metrics[9] and "valid_loss" in metrics[19]
    checkpoints = [e for e in events if e["type"] == "checkpoint"]
    assert [c["step"] for c in checkpoints] == [10, 20]
    for c in checkpoints:  # each right after its step's metrics, and whole on disk
        at = events.index(c)
        assert events[at - 1]["type"] == "metrics" and events[at - 1]["step"] == c["step"]
        assert (Path(c["path"]) / "trainer_state.json").is_file()
    result = events[-1]
    assert result["kind"] == "lora" and result["lora"] == {"rank": 4, "alpha": 8.0}
    assert result["trained_tokens"] == metrics[-1]["trained_tokens"] > 0
    assert result["base"] == {"architecture": "llama", "checkpoint_sha256": gguf_export.checkpoint_sha256(tiny[0])}
    adapter = Path(result["path"])
    assert gguf_export.file_sha256(adapter) == result["sha256"]
    assert losses(events)[20] < losses(events)[1]
    llama_logits(tiny[1], [1, 2, 3], lora=adapter)  # loads and runs


def test_llama_cpp_with_the_adapter_reproduces_hf_peft_logits(
        lora_run: tuple[Path, list[dict[str, Any]]], tiny: tuple[Path, Path]) -> None:
    _, events = lora_run
    adapter_gguf = Path(events[-1]["path"])
    peft_dir = adapter_gguf.parent / "adapter"
    ids, hf_base, hf_tuned = hf_reference(tiny[0], peft_dir, chat_text(tiny[0]))
    assert hf_tuned is not None
    assert ids == llama_cpp_ids(tiny[1], chat_text(tiny[0]))  # HF's tokenizer and the GGUF's agree
    tuned = llama_logits(tiny[1], ids, lora=adapter_gguf)
    base = llama_logits(tiny[1], ids)
    assert np.abs(base - hf_base).max() < 1e-3  # the exported base is the HF model
    # Measured at lr 0.01: 2.7e-4 with LoRA-B of q/k permuted, 0.40 without; the base alone is 1.2 away.
    tuned_diff = float(np.abs(tuned - hf_tuned).max())
    base_diff = float(np.abs(base - hf_tuned).max())
    assert tuned_diff < 2e-3, tuned_diff
    assert base_diff > 50 * tuned_diff, (base_diff, tuned_diff)


def test_a_killed_run_resumes_from_its_checkpoint_with_the_same_losses(
        lora_run: tuple[Path, list[dict[str, Any]]], tiny: tuple[Path, Path], train_file: Path,
        tmp_path: Path) -> None:
    reference = losses(lora_run[1])
    spec = make_spec(tmp_path, tiny[0], train_file, validation_file=str(train_file))
    proc = start(spec)
    try:
        checkpoint = wait_event(spec, proc, "checkpoint")
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        kill_group(proc)
    assert checkpoint["step"] == 10
    first = read_events(spec)
    assert proc.returncode == -signal.SIGKILL and max(losses(first)) < 20  # killed mid-run, not finished
    resumed_spec = make_spec(tmp_path, tiny[0], train_file, validation_file=str(train_file),
                             resume_from=checkpoint["path"])
    code, events, err = run(resumed_spec)
    assert code == 0, (events[len(first):], err)
    after = events[len(first):]
    assert any(e["type"] == "message" and "resumed from step 10" in e["message"] for e in after)
    resumed = losses(after)
    assert sorted(resumed) == list(range(11, 21))
    for step, loss in resumed.items():
        assert loss == pytest.approx(reference[step], abs=1e-6), step
    assert after[-1]["type"] == "result"
    assert after[-1]["trained_tokens"] == lora_run[1][-1]["trained_tokens"]


def test_sigterm_to_the_group_cancels_promptly(tiny: tuple[Path, Path], train_file: Path, tmp_path: Path) -> None:
    spec = make_spec(tmp_path, tiny[0], train_file,
                     hyperparameters={"n_epochs": 1, "batch_size": 1, "learning_rate": 1e-3, "max_steps": 100000},
                     checkpoint_every=100000)
    proc = start(spec)
    try:
        wait_event(spec, proc, "metrics")
        os.killpg(proc.pid, signal.SIGTERM)
        began = time.monotonic()
        proc.wait(timeout=30)
        stopped_in = time.monotonic() - began
    finally:
        kill_group(proc)
    events = read_events(spec)
    assert proc.returncode == 143
    assert stopped_in < 5
    assert events[-1]["type"] == "message" and "cancelled" in events[-1]["message"]
    assert not any(e["type"] in ("result", "checkpoint") for e in events)


def test_sigterm_before_training_exits_at_once(tiny: tuple[Path, Path], train_file: Path, tmp_path: Path) -> None:
    spec = make_spec(tmp_path, tiny[0], train_file)
    proc = start(spec)
    try:
        wait_event(spec, proc, "message")  # the handler is in place; torch is still loading
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        kill_group(proc)
    events = read_events(spec)
    assert proc.returncode == 143
    assert [e["type"] for e in events] == ["message", "message"]
    assert events[-1]["message"] == "cancelled (SIGTERM)"


def test_full_fine_tune_writes_a_model_gguf_llama_cpp_loads(
        tiny: tuple[Path, Path], train_file: Path, tmp_path: Path) -> None:
    spec = make_spec(tmp_path, tiny[0], train_file, method="full",
                     hyperparameters={"n_epochs": 1, "batch_size": 2, "learning_rate": 1e-3, "max_steps": 3})
    code, events, err = run(spec)
    assert code == 0, (events, err)
    result = events[-1]
    assert result["type"] == "result" and result["kind"] == "full" and result["lora"] is None
    tuned = llama_logits(Path(result["path"]), [258, 117, 115])
    assert np.abs(tuned - llama_logits(tiny[1], [258, 117, 115])).max() > 1e-4


def test_qlora_without_cuda_trains_as_lora_and_warns(
        tiny: tuple[Path, Path], train_file: Path, tmp_path: Path) -> None:
    spec = make_spec(tmp_path, tiny[0], train_file, method="qlora",
                     hyperparameters={"n_epochs": 1, "batch_size": 4, "learning_rate": 1e-3, "max_steps": 2})
    code, events, err = run(spec)
    assert code == 0, (events, err)
    warns = [e for e in events if e["type"] == "message" and e["level"] == "warn"]
    assert any("training as LoRA" in w["message"] for w in warns)
    assert events[-1]["kind"] == "lora"


# ---- bad specs ----

@pytest.mark.parametrize(("change", "wording"), [
    ({"training_file": "/nonexistent/train.jsonl"}, "training_file: /nonexistent/train.jsonl does not exist"),
    ({"method": "dpo"}, "method: unknown value 'dpo' (valid: lora, qlora, full)"),
    ({"lora": {"rank": 4, "alpha": 8, "target_modules": ["lm_head"]}}, "no llama.cpp tensor name"),
    ({"hyperparameters": {"n_epochs": "3"}}, "hyperparameters.n_epochs: expected int, got '3'"),
    ({"resume_from": "/"}, "resume_from: / is not a checkpoint"),
])
def test_bad_spec_exits_2_with_an_error_event(tiny: tuple[Path, Path], train_file: Path, tmp_path: Path,
                                              change: dict[str, Any], wording: str) -> None:
    code, events, err = run(make_spec(tmp_path, tiny[0], train_file, **change))
    assert code == 2, err
    assert events[-1]["type"] == "message" and events[-1]["level"] == "error"
    assert wording in events[-1]["message"]


def test_unusable_events_path_exits_2_on_stderr(tiny: tuple[Path, Path], train_file: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    code, _, err = run(make_spec(tmp_path, tiny[0], train_file, events_path=str(tmp_path / "file" / "events.jsonl")))
    assert code == 2
    assert "events.jsonl" in err


# ---- export units ----

def test_check_adapter_refuses_what_llama_cpp_cannot_apply() -> None:
    ok = {"peft_type": "LORA", "target_modules": ["q_proj", "v_proj"], "r": 8, "lora_alpha": 16}
    gguf_export.check_adapter_supported(ok)
    with pytest.raises(ValueError, match="DoRA"):
        gguf_export.check_adapter_supported({**ok, "use_dora": True})
    with pytest.raises(ValueError, match="modules_to_save"):
        gguf_export.check_adapter_supported({**ok, "modules_to_save": ["lm_head"]})
    with pytest.raises(ValueError, match=r"\['embed_tokens'\] have no llama.cpp tensor name"):
        gguf_export.check_adapter_supported({**ok, "target_modules": ["q_proj", "embed_tokens"]})


def test_other_architectures_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="architecture 'qwen2' \\(Qwen2ForCausalLM\\)"):
        gguf_export.check_architecture({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]})


def test_adapter_gguf_names_and_type(lora_run: tuple[Path, list[dict[str, Any]]]) -> None:
    import gguf

    reader = gguf.GGUFReader(lora_run[1][-1]["path"])
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    assert fields["general.type"] == "adapter"
    assert fields["general.architecture"] == "llama"
    assert fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 8.0
    names = {t.name for t in reader.tensors}
    for block in (0, 1):
        for base in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            assert {f"blk.{block}.{base}.weight.lora_a", f"blk.{block}.{base}.weight.lora_b"} <= names
    assert len(names) == 2 * 2 * 7


def test_lora_b_of_q_and_k_is_permuted_and_a_is_not(
        lora_run: tuple[Path, list[dict[str, Any]]]) -> None:
    import gguf

    adapter_dir = Path(lora_run[1][-1]["path"]).parent / "adapter"
    peft = dict(gguf_export.read_safetensors(adapter_dir / "adapter_model.safetensors"))
    tensors = {t.name: np.array(t.data) for t in gguf.GGUFReader(lora_run[1][-1]["path"]).tensors}
    prefix = "base_model.model.model.layers.0.self_attn"
    q_b = peft[f"{prefix}.q_proj.lora_B.weight"]
    assert np.array_equal(tensors["blk.0.attn_q.weight.lora_b"], gguf_export.permute_rows(q_b, 2))
    assert not np.array_equal(tensors["blk.0.attn_q.weight.lora_b"], q_b)
    assert np.array_equal(tensors["blk.0.attn_q.weight.lora_a"], peft[f"{prefix}.q_proj.lora_A.weight"])
    assert np.array_equal(tensors["blk.0.attn_v.weight.lora_b"], peft[f"{prefix}.v_proj.lora_B.weight"])


def test_permutation_matches_convert_hf_to_gguf() -> None:
    # One head of 4 rows: HF's halves [0 1 | 2 3] become llama.cpp's interleave [0 2 1 3].
    rows = np.arange(8, dtype=np.float32).reshape(8, 1)
    assert gguf_export.permute_rows(rows, 2).ravel().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_the_trainer_module_imports_no_training_stack() -> None:
    code = ("import sys, hybridd.jobs.hf_trainer, hybridd.jobs.gguf_export\n"
            "print(','.join(m for m in ('torch', 'transformers', 'peft', 'trl', 'asyncio', 'aiohttp') "
            "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=ENV)
    assert result.stdout.strip() == ""


def test_missing_training_extra_exits_3(tiny: tuple[Path, Path], train_file: Path, tmp_path: Path) -> None:
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "peft.py").write_text("raise ImportError('no peft here', name='peft')\n")
    spec = make_spec(tmp_path, tiny[0], train_file)
    env = {**ENV, "PYTHONPATH": f"{shadow}{os.pathsep}{ROOT}"}
    result = subprocess.run([sys.executable, "-m", "hybridd.jobs.hf_trainer", str(spec)], cwd=ROOT, env=env,
                            capture_output=True, timeout=60)
    assert result.returncode == 3
    assert "pip install 'hybridd[train]'" in read_events(spec)[-1]["message"]


def test_llama3_rope_scaling_exports_rope_freqs_that_match_hf(tmp_path: Path) -> None:
    from hybridd.demo.tiny_hf import write_tiny_hf_llama

    hf_dir = write_tiny_hf_llama(tmp_path / "hf")
    config = json.loads((hf_dir / "config.json").read_text())
    # A short original context puts the 16 frequencies in all three of llama3's bands.
    config["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 64}
    (hf_dir / "config.json").write_text(json.dumps(config))
    factors = gguf_export.llama3_rope_factors(config)
    assert factors[0] == 1.0 and factors[-1] == 8.0 and any(1.0 < f < 8.0 for f in factors)
    gguf_path = gguf_export.export_model_gguf(hf_dir, tmp_path / "llama3.gguf")
    ids, hf_logits, _ = hf_reference(hf_dir, None, chat_text(hf_dir) * 3)
    # Measured: 1.1e-4 with rope_freqs, 4.0e-3 without.
    assert np.abs(llama_logits(gguf_path, ids) - hf_logits).max() < 5e-4


def test_half_precision_exports_load_and_agree(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    import gguf

    ids = [258, 117, 115, 101, 114, 10, 72, 256, 108, 108, 111]
    reference = llama_logits(tiny[1], ids)
    for out_type, qtype in (("f16", gguf.GGMLQuantizationType.F16), ("bf16", gguf.GGMLQuantizationType.BF16)):
        path = gguf_export.export_model_gguf(tiny[0], tmp_path / f"{out_type}.gguf", out_type=out_type)
        types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
        assert types["blk.0.attn_q.weight"] == qtype
        assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
        assert np.abs(llama_logits(path, ids) - reference).max() < 2e-2


def test_bf16_safetensors_are_read_without_torch(tmp_path: Path) -> None:
    values = np.array([[1.0, -2.5], [0.15625, 3.0e-3]], dtype=np.float32)
    raw = (values.view(np.uint32) >> 16).astype(np.uint16).tobytes()
    header = json.dumps({"w": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, len(raw)]}}).encode()
    path = tmp_path / "bf16.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + raw)
    (name, array), = gguf_export.read_safetensors(path)
    assert name == "w" and array.dtype == np.float32
    assert np.allclose(array, values, rtol=1e-2) and array[0].tolist() == [1.0, -2.5]
