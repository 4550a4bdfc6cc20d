"""The built-in trainer: `python -m hybridd.jobs.hf_trainer SPEC.json` (plugins/trainers.md has the whole contract).

It fine-tunes a Hugging Face checkpoint on chat JSONL with transformers' Trainer (LoRA/QLoRA through peft, or all
weights), writes JSON-line events to the spec's events_path, checkpoints atomically under output_dir/checkpoints,
and ends with a GGUF (a llama.cpp LoRA adapter, or the whole model) and a result event.

Loss is on assistant turns only: each example's chat template text is rendered prefix by prefix to find the
assistant spans; a template whose prefixes do not line up falls back to the whole sequence, with a warn event.

Exit codes: 0 result written, 1 training failed, 2 bad spec, 3 the training extra is missing, 143 cancelled (SIGTERM).
torch, transformers and peft are imported inside functions: they are the optional extra hybridd[train].
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from hybridd.jobs import gguf_export  # numpy at import time; no torch

EXIT_OK, EXIT_FAILED, EXIT_BAD_SPEC, EXIT_NO_EXTRA, EXIT_CANCELLED = 0, 1, 2, 3, 143
METHODS = ("lora", "qlora", "full")
# With no target_modules: every projection llama.cpp can apply a LoRA to.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CANCEL_GRACE_S = 5.0  # after SIGTERM, how long a step may run on before exiting mid-step (daemon's grace: 10 s)
INSTALL_HINT = "pip install 'hybridd[train]'"


class SpecError(ValueError):
    """The spec file is unusable; the message names the key."""


@dataclass(frozen=True)
class TrainSpec:
    """The spec file, checked."""

    job_id: str
    base_model_dir: Path
    training_file: Path
    validation_file: Path | None
    method: str
    n_epochs: int
    batch_size: int
    learning_rate: float
    max_steps: int | None
    lora_rank: int
    lora_alpha: float
    lora_dropout: float
    target_modules: tuple[str, ...] | None
    seed: int
    max_seq: int
    output_dir: Path
    resume_from: Path | None
    checkpoint_every: int
    events_path: Path


def parse_spec(raw: Any) -> TrainSpec:
    """A TrainSpec from the decoded spec JSON; SpecError naming the first bad key."""
    if not isinstance(raw, dict):
        raise SpecError("spec: expected a JSON object")
    if raw.get("version") != 1:
        raise SpecError(f"version: unsupported value {raw.get('version')!r} (valid: 1)")

    def get(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], dotted: str, default: Any = ...) -> Any:
        value = obj.get(key)
        if value is None and default is not ...:
            return default
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise SpecError(f"{dotted}: expected {names}, got {value!r}")
        return value

    def path(key: str, optional: bool = False, must_exist: bool = True) -> Path | None:
        value = get(raw, key, str, key, None if optional else ...)
        if value is None:
            return None
        p = Path(value)
        if not p.is_absolute():
            raise SpecError(f"{key}: must be an absolute path, got {value!r}")
        if must_exist and not p.exists():
            raise SpecError(f"{key}: {value} does not exist")
        return p

    method = get(raw, "method", str, "method")
    if method not in METHODS:
        raise SpecError(f"method: unknown value {method!r} (valid: {', '.join(METHODS)})")
    hyper = get(raw, "hyperparameters", dict, "hyperparameters", {})
    lora = raw.get("lora") or {}
    if not isinstance(lora, dict):
        raise SpecError("lora: expected an object")
    targets = lora.get("target_modules")
    if targets is not None and (not isinstance(targets, list) or not all(isinstance(t, str) for t in targets)):
        raise SpecError(f"lora.target_modules: expected a list of module names or null, got {targets!r}")
    number = (int, float)
    spec = TrainSpec(
        job_id=get(raw, "job_id", str, "job_id"),
        base_model_dir=path("base_model_dir"),  # type: ignore[arg-type]
        training_file=path("training_file"),  # type: ignore[arg-type]
        validation_file=path("validation_file", optional=True),
        method=method,
        n_epochs=get(hyper, "n_epochs", int, "hyperparameters.n_epochs", 1),
        batch_size=get(hyper, "batch_size", int, "hyperparameters.batch_size", 1),
        learning_rate=float(get(hyper, "learning_rate", number, "hyperparameters.learning_rate", 2e-4)),
        max_steps=get(hyper, "max_steps", int, "hyperparameters.max_steps", None),
        lora_rank=get(lora, "rank", int, "lora.rank", 8),
        lora_alpha=float(get(lora, "alpha", number, "lora.alpha", 16)),
        lora_dropout=float(get(lora, "dropout", number, "lora.dropout", 0.0)),
        target_modules=tuple(targets) if targets is not None else None,
        seed=get(raw, "seed", int, "seed", 0),
        max_seq=get(raw, "max_seq", int, "max_seq", 2048),
        output_dir=path("output_dir", must_exist=False),  # type: ignore[arg-type]
        resume_from=path("resume_from", optional=True),
        checkpoint_every=get(raw, "checkpoint_every", int, "checkpoint_every", 10**9),
        events_path=path("events_path", must_exist=False),  # type: ignore[arg-type]
    )
    for key, value in (("hyperparameters.n_epochs", spec.n_epochs), ("hyperparameters.batch_size", spec.batch_size),
                       ("lora.rank", spec.lora_rank), ("max_seq", spec.max_seq),
                       ("checkpoint_every", spec.checkpoint_every)):
        if value < 1:
            raise SpecError(f"{key}: must be at least 1, got {value}")
    if not 0.0 <= spec.lora_dropout < 1.0:
        raise SpecError(f"lora.dropout: must be in [0, 1), got {spec.lora_dropout}")
    if spec.learning_rate <= 0:
        raise SpecError(f"hyperparameters.learning_rate: must be positive, got {spec.learning_rate}")
    if spec.max_steps is not None and spec.max_steps < 1:
        raise SpecError(f"hyperparameters.max_steps: must be at least 1 or null, got {spec.max_steps}")
    if spec.resume_from is not None and not (spec.resume_from / "trainer_state.json").is_file():
        raise SpecError(f"resume_from: {spec.resume_from} is not a checkpoint (no trainer_state.json)")
    if not (spec.base_model_dir / "config.json").is_file():
        raise SpecError(f"base_model_dir: {spec.base_model_dir} holds no config.json")
    return spec


class Events:
    """Appends one JSON object a line to the events file, flushed after each."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.RLock()  # a SIGTERM handler may emit while the main thread is mid-emit

    def emit(self, kind: str, /, **fields: Any) -> None:
        line = json.dumps({"type": kind, "time": time.time(), **fields})
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()

    def message(self, level: str, text: str) -> None:
        self.emit("message", level=level, message=text)


class Cancel:
    """SIGTERM: outside the step loop, exit now; inside it, stop at the next step boundary, or after
    CANCEL_GRACE_S regardless (a step of a large model can take that long)."""

    def __init__(self, events: Events) -> None:
        self.requested = False
        self.in_step_loop = False
        self._events = events

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.requested:
            return
        self.requested = True
        if not self.in_step_loop:
            self.exit_now()
        timer = threading.Timer(CANCEL_GRACE_S, self.exit_now)
        timer.daemon = True
        timer.start()

    def exit_now(self) -> None:
        self._events.message("info", "cancelled (SIGTERM)")
        os._exit(EXIT_CANCELLED)


def main(argv: list[str]) -> int:
    """Run the spec at argv[0]; the exit code."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if len(argv) != 1:
        print("usage: python -m hybridd.jobs.hf_trainer SPEC.json", file=sys.stderr)
        return EXIT_BAD_SPEC
    try:
        raw = json.loads(Path(argv[0]).read_text())
    except (OSError, ValueError) as exc:
        print(f"spec {argv[0]}: {exc}", file=sys.stderr)
        return EXIT_BAD_SPEC
    events_value = raw.get("events_path") if isinstance(raw, dict) else None
    try:
        if not isinstance(events_value, str) or not Path(events_value).is_absolute():
            raise SpecError(f"events_path: expected an absolute path, got {events_value!r}")
        Path(events_value).parent.mkdir(parents=True, exist_ok=True)
        stream = open(events_value, "a", encoding="utf-8")  # noqa: SIM115 - held until the process exits
    except (OSError, SpecError) as exc:
        print(f"spec {argv[0]}: events_path {events_value}: {exc}", file=sys.stderr)
        return EXIT_BAD_SPEC
    events = Events(stream)
    cancel = Cancel(events)
    cancel.install()
    events.message("info", f"trainer started (pid {os.getpid()})")
    try:
        spec = parse_spec(raw)
    except SpecError as exc:
        events.message("error", f"bad spec: {exc}")
        return EXIT_BAD_SPEC
    try:
        _check_exportable(spec)
    except ValueError as exc:
        events.message("error", f"bad spec: {exc}")
        return EXIT_BAD_SPEC
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        events.message("error", f"the training extra is missing ({exc.name or exc}): {INSTALL_HINT}")
        return EXIT_NO_EXTRA
    try:
        code = _train(spec, events, cancel)
    except Exception as exc:
        if cancel.requested:
            cancel.exit_now()
        events.message("error", f"training failed: {type(exc).__name__}: {exc}")
        return EXIT_FAILED
    if cancel.requested:
        events.message("info", "cancelled (SIGTERM)")
        return EXIT_CANCELLED
    return code


def _check_exportable(spec: TrainSpec) -> None:
    config = json.loads((spec.base_model_dir / "config.json").read_text())
    gguf_export.check_architecture(config)
    if spec.method != "full":
        targets = list(spec.target_modules or DEFAULT_TARGETS)
        gguf_export.check_adapter_supported({"target_modules": targets})


# ---- data ----

def _read_examples(path: Path) -> list[list[dict[str, Any]]]:
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            messages = json.loads(line)["messages"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path.name} line {number}: not a chat example ({exc})") from exc
        examples.append(messages)
    if not examples:
        raise ValueError(f"{path.name}: no training examples")
    return examples


def _assistant_spans(tokenizer: Any, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]] | None]:
    """The example's chat text and the character spans of its assistant turns (None when prefixes don't line up)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        start_text = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) \
            if i else ""
        end_text = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
        if not text.startswith(start_text) or not text.startswith(end_text):
            return text, None
        spans.append((len(start_text), len(end_text)))
    return text, spans


def _tokenize(tokenizer: Any, examples: list[list[dict[str, Any]]], max_seq: int,
              events: Events) -> list[dict[str, list[int]]]:
    rows = []
    whole = 0
    for messages in examples:
        text, spans = _assistant_spans(tokenizer, messages)
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                            truncation=True, max_length=max_seq)
        ids = list(encoded["input_ids"])
        if spans is None:
            whole += 1
            labels = list(ids)
        else:
            labels = [tok if any(s <= a and b <= e and a < b for s, e in spans) else -100
                      for tok, (a, b) in zip(ids, encoded["offset_mapping"], strict=True)]
        if all(label == -100 for label in labels):
            continue
        rows.append({"input_ids": ids, "labels": labels})
    if whole:
        events.message("warn", f"{whole} example(s): the chat template's prefixes don't line up, "
                               "so the loss is on the whole sequence for them")
    if not rows:
        raise ValueError("no example has an assistant turn to train on (within max_seq)")
    return rows


def _collate(pad_id: int) -> Any:
    import torch

    def collate(rows: list[dict[str, list[int]]]) -> dict[str, Any]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = [r["input_ids"] + [pad_id] * (width - len(r["input_ids"])) for r in rows]
        labels = [r["labels"] + [-100] * (width - len(r["labels"])) for r in rows]
        mask = [[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows]
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}

    return collate


# ---- training ----

def _train(spec: TrainSpec, events: Events, cancel: Cancel) -> int:
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from transformers.trainer_utils import set_seed
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stdout and stderr stay quiet: the events file is the channel
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)  # the stack's deprecation notes, not our news
    set_seed(spec.seed)
    spec.output_dir.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    dtype = torch.bfloat16 if bf16 else torch.float32
    method = spec.method
    load_kwargs: dict[str, Any] = {"dtype": dtype}
    if method == "qlora":
        if cuda and importlib.util.find_spec("bitsandbytes") is not None:
            from transformers import BitsAndBytesConfig

            load_kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                bnb_4bit_use_double_quant=True)
        else:
            missing = "CUDA" if not cuda else "bitsandbytes"
            events.message("warn", f"qlora needs CUDA and bitsandbytes ({missing} is missing here): training as "
                                   f"LoRA over {str(dtype).removeprefix('torch.')} weights instead")
            method = "lora"

    tokenizer = AutoTokenizer.from_pretrained(str(spec.base_model_dir))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise ValueError(f"{spec.base_model_dir}: the tokenizer has no chat template")
    train_rows = _tokenize(tokenizer, _read_examples(spec.training_file), spec.max_seq, events)
    valid_rows = (_tokenize(tokenizer, _read_examples(spec.validation_file), spec.max_seq, events)
                  if spec.validation_file else None)

    model = AutoModelForCausalLM.from_pretrained(str(spec.base_model_dir), **load_kwargs)
    lora_info = None
    if method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if method == "qlora":
            model = prepare_model_for_kbit_training(model)
        lora_config = LoraConfig(r=spec.lora_rank, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout,
                                 target_modules=list(spec.target_modules or DEFAULT_TARGETS), bias="none",
                                 task_type="CAUSAL_LM")
        model = get_peft_model(model, lora_config)
        lora_info = {"rank": spec.lora_rank, "alpha": spec.lora_alpha}

    steps_per_epoch = math.ceil(len(train_rows) / spec.batch_size)
    total_steps = spec.max_steps or steps_per_epoch * spec.n_epochs
    work_dir = spec.output_dir / ".trainer"
    checkpoints = spec.output_dir / "checkpoints"
    checkpoints.mkdir(exist_ok=True)
    do_eval = valid_rows is not None
    args = TrainingArguments(
        output_dir=str(work_dir), per_device_train_batch_size=spec.batch_size,
        per_device_eval_batch_size=spec.batch_size, num_train_epochs=spec.n_epochs,
        max_steps=total_steps, learning_rate=spec.learning_rate, lr_scheduler_type="linear", warmup_steps=0,
        logging_steps=1, save_strategy="steps", save_steps=spec.checkpoint_every,
        eval_strategy="steps" if do_eval else "no", eval_steps=spec.checkpoint_every if do_eval else None,
        report_to="none", seed=spec.seed, data_seed=spec.seed, dataloader_num_workers=0, disable_tqdm=True,
        remove_unused_columns=False, use_cpu=not cuda, bf16=bf16,
    )
    state: dict[str, Any] = {"loss": math.nan, "lr": spec.learning_rate, "tokens": 0, "step_tokens": 0,
                             "step_start": time.monotonic()}
    pending: dict[str, Any] = {}

    class StepTrainer(Trainer):
        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
            loss = result[0] if return_outputs else result
            if model.training:
                state["loss"] = float(loss.detach().float().item())
                state["step_tokens"] += int(inputs["attention_mask"].sum().item())
            return result

    def flush() -> None:
        if pending:
            events.emit("metrics", **pending)
            pending.clear()

    class EventCallback(TrainerCallback):
        def on_train_begin(self, args: Any, st: Any, control: Any, **kwargs: Any) -> None:
            cancel.in_step_loop = True
            if cancel.requested:  # arrived while the step loop was being set up
                cancel.exit_now()

        def on_train_end(self, args: Any, st: Any, control: Any, **kwargs: Any) -> None:
            cancel.in_step_loop = False

        def on_step_begin(self, args: Any, st: Any, control: Any, **kwargs: Any) -> None:
            flush()
            state["step_start"] = time.monotonic()
            state["step_tokens"] = 0

        def on_optimizer_step(self, args: Any, st: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
            # The rate this step ran at (the scheduler steps before on_step_end).
            state["lr"] = float(optimizer.param_groups[0]["lr"])

        def on_step_end(self, args: Any, st: Any, control: Any, **kwargs: Any) -> Any:
            elapsed = max(time.monotonic() - state["step_start"], 1e-9)
            state["tokens"] += state["step_tokens"]
            pending.update(step=st.global_step, total_steps=st.max_steps, loss=state["loss"],
                           learning_rate=state["lr"], tokens_per_s=state["step_tokens"] / elapsed,
                           trained_tokens=state["tokens"], epoch=float(st.epoch or 0.0))
            if cancel.requested:
                control.should_training_stop = True
                control.should_save = False
                control.should_evaluate = False
            elif st.global_step >= st.max_steps:
                control.should_save = True
            if not control.should_evaluate:
                flush()
            return control

        def on_evaluate(self, args: Any, st: Any, control: Any, metrics: Any = None, **kwargs: Any) -> None:
            if metrics and "eval_loss" in metrics:
                pending["valid_loss"] = float(metrics["eval_loss"])
            flush()

        def on_save(self, args: Any, st: Any, control: Any, **kwargs: Any) -> None:
            flush()
            source = work_dir / f"checkpoint-{st.global_step}"
            (source / TOKENS_FILE).write_text(json.dumps({"trained_tokens": state["tokens"]}))
            target = checkpoints / f"step-{st.global_step:06d}"
            if target.exists():  # left by an earlier, interrupted run of this job
                trash = checkpoints / f".old-{target.name}"
                shutil.rmtree(trash, ignore_errors=True)
                target.rename(trash)
                shutil.rmtree(trash, ignore_errors=True)
            source.rename(target)  # one rename: the checkpoint is whole or absent
            events.emit("checkpoint", step=st.global_step, path=str(target), metrics={"loss": state["loss"]})

    trainer = StepTrainer(model=model, args=args, train_dataset=train_rows, eval_dataset=valid_rows,
                          data_collator=_collate(int(tokenizer.pad_token_id)), callbacks=[EventCallback()])
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    resume = None
    if spec.resume_from is not None:
        resume = str(spec.resume_from)
        trainer_state = json.loads((spec.resume_from / "trainer_state.json").read_text())
        state["tokens"] = int(_read_tokens(spec.resume_from))
        events.message("info", f"resumed from step {trainer_state['global_step']} ({spec.resume_from})")
    events.message("info", f"training {spec.method} on {len(train_rows)} examples for {total_steps} steps")
    trainer.train(resume_from_checkpoint=resume)
    flush()
    if cancel.requested:
        return EXIT_CANCELLED

    base_sha = gguf_export.checkpoint_sha256(spec.base_model_dir)
    config = json.loads((spec.base_model_dir / "config.json").read_text())
    if lora_info is not None:
        adapter_dir = spec.output_dir / "adapter"
        trainer.model.save_pretrained(str(adapter_dir))
        out = gguf_export.export_lora_gguf(adapter_dir, config, spec.output_dir / "adapter.gguf", name=spec.job_id)
        kind = "lora"
    else:
        model_dir = spec.output_dir / "model"
        trainer.model.save_pretrained(str(model_dir), safe_serialization=True)
        tokenizer.save_pretrained(str(model_dir))
        out = gguf_export.export_model_gguf(model_dir, spec.output_dir / "model.gguf", name=spec.job_id)
        kind = "full"
    shutil.rmtree(work_dir, ignore_errors=True)
    events.emit("result", kind=kind, path=str(out), sha256=gguf_export.file_sha256(out),
                trained_tokens=state["tokens"], base={"architecture": "llama", "checkpoint_sha256": base_sha},
                lora=lora_info)
    return EXIT_OK


TOKENS_FILE = "hybridd_tokens.json"  # trained_tokens at a checkpoint, so a resumed run counts on from it


def _read_tokens(checkpoint: Path) -> int:
    try:
        return int(json.loads((checkpoint / TOKENS_FILE).read_text())["trained_tokens"])
    except (OSError, ValueError, KeyError):
        return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
