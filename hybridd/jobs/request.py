"""A fine-tuning job request as the OpenAI API takes it, checked field by field, and the trainer's spec made from it.

    {"model": "llama-3.1-8b", "training_file": "file-…", "validation_file": null, "suffix": "support",
     "seed": 7, "hyperparameters": {"n_epochs": "auto", "batch_size": 4, "learning_rate_multiplier": 2},
     "method": {"type": "supervised", "supervised": {"hyperparameters": {…}}},
     "metadata": {"team": "a"},
     "hybridd": {"adapter": "lora", "rank": 16, "max_seq": 2048}}

`hybridd` is this server's own object (the SDK's `extra_body`). What llama.cpp cannot run is refused here, before
anything trains: DoRA, `modules_to_save`, added tokens.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hybridd.errors import BadRequest
from hybridd.model.training import TrainMethod
from hybridd.validate import JSON, Reader

MAX_SUFFIX_CHARS = 64  # as OpenAI
MAX_METADATA = 16
AUTO = "auto"
# What "auto" resolves to: few epochs over a small set, one example a step, the base learning rate.
AUTO_EPOCHS = 3
AUTO_BATCH = 1
AUTO_LR_MULTIPLIER = 1.0
# The learning rate a multiplier of 1 means: the usual LoRA rate, a tenth of it for a full fine-tune.
BASE_LEARNING_RATE = {TrainMethod.LORA: 2e-4, TrainMethod.QLORA: 2e-4, TrainMethod.FULL: 2e-5}
# Asked of an adapter, refused: llama.cpp applies plain LoRA matrices to existing tensors only.
UNSUPPORTED = {
    "use_dora": "llama.cpp cannot run DoRA adapters",
    "modules_to_save": "llama.cpp applies LoRA matrices only; fully trained modules (modules_to_save) cannot be "
                       "served as an adapter",
    "added_tokens": "llama.cpp cannot add tokens to a base model through an adapter",
}
_HYBRIDD_KEYS = ("adapter", "rank", "alpha", "max_seq", "max_steps", "target_modules", *UNSUPPORTED)
_HYPER_KEYS = ("n_epochs", "batch_size", "learning_rate_multiplier")


@dataclass(frozen=True)
class JobRequest:
    """A checked request: everything a job needs but its id, placement and the files' contents."""

    model: str
    training_file: str
    validation_file: str | None
    suffix: str | None
    seed: int
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    adapter: str | None  # None: chosen by fit
    rank: int | None
    alpha: int | None
    max_seq: int | None
    max_steps: int | None
    target_modules: tuple[str, ...] | None
    metadata: dict[str, str] | None
    auto: tuple[str, ...]


def _error(message: str) -> BadRequest:
    return BadRequest(message)


def parse_job_request(body: Any) -> JobRequest:
    """The request, or BadRequest naming the field that is wrong."""
    fields = Reader(body, _error, JSON).table(
        ("model", "training_file", "validation_file", "suffix", "seed", "hyperparameters", "method", "metadata",
         "integrations", "hybridd"))
    model = fields.at("model").text(max_chars=256)
    training_file = fields.at("training_file").text(max_chars=256)
    validation_file = fields.at("validation_file").of(str, None)
    suffix = fields.at("suffix").of(str, None)
    if suffix is not None and (len(suffix) > MAX_SUFFIX_CHARS or not all(c.isalnum() or c in "-_." for c in suffix)):
        raise BadRequest(f"suffix: up to {MAX_SUFFIX_CHARS} letters, digits, '-', '_' or '.'", "suffix")
    seed = fields.at("seed").integer(secrets.randbelow(2**31), low=0, high=2**31 - 1)
    if fields.at("integrations").items(optional=True):
        raise BadRequest("integrations: none are supported here (no Weights and Biases)", "integrations")
    hyper = _hyperparameters(fields)
    metadata = None
    if fields.at("metadata").present and fields.at("metadata").value is not None:
        entries = fields.at("metadata").entries(max_items=MAX_METADATA, max_key_chars=64)
        metadata = {key: value.text(max_chars=512) for key, value in entries.items()}
    own = fields.at("hybridd").table(_HYBRIDD_KEYS, optional=True)
    for key, why in UNSUPPORTED.items():
        if own.at(key).present and own.at(key).value not in (None, False, [], {}):
            raise BadRequest(f"hybridd.{key}: {why}", f"hybridd.{key}")
    adapter = own.at("adapter").choice(tuple(m.value for m in TrainMethod), None, what="adapter kind")
    targets = own.at("target_modules").items(optional=True, max_items=64)
    return JobRequest(
        model=model, training_file=training_file, validation_file=validation_file, suffix=suffix, seed=seed,
        n_epochs=hyper["n_epochs"], batch_size=hyper["batch_size"],
        learning_rate_multiplier=hyper["learning_rate_multiplier"],
        adapter=adapter,
        rank=own.at("rank").integer(None, low=1, high=4096),
        alpha=own.at("alpha").integer(None, low=1, high=1 << 16),
        max_seq=own.at("max_seq").integer(None, low=16, high=1 << 20),
        max_steps=own.at("max_steps").integer(None, low=1, high=1 << 31),
        target_modules=tuple(t.text(max_chars=128) for t in targets) if targets else None,
        metadata=metadata,
        auto=tuple(hyper["auto"]),
    )


def _hyperparameters(fields: Reader) -> dict[str, Any]:
    """n_epochs, batch_size and learning_rate_multiplier from `method.supervised.hyperparameters` or the older
    top-level `hyperparameters` (not both); each "auto" or a number."""
    method = fields.at("method").table(("type", "supervised", "dpo", "reinforcement"), optional=True)
    kind = method.at("type").of(str, "supervised")
    if kind != "supervised":
        raise BadRequest(f"method.type: only \"supervised\" fine-tuning runs here, not {kind[:40]!r}", "method")
    nested = method.at("supervised").table(("hyperparameters",), optional=True).at("hyperparameters")
    top = fields.at("hyperparameters")
    if nested.present and top.present:
        raise BadRequest("give hyperparameters once: in method.supervised.hyperparameters or at the top, "
                         "not both", "hyperparameters")
    table = (nested if nested.present else top).table(_HYPER_KEYS, optional=True)
    auto: list[str] = []

    def value(name: str, default: float, integer: bool, high: float) -> Any:
        item = table.at(name)
        if not item.present or item.value == AUTO:
            auto.append(name)
            return int(default) if integer else default
        if integer:
            return item.integer(low=1, high=int(high))
        return item.number(above=0, high=high)

    return {"n_epochs": value("n_epochs", AUTO_EPOCHS, True, 50),
            "batch_size": value("batch_size", AUTO_BATCH, True, 256),
            "learning_rate_multiplier": value("learning_rate_multiplier", AUTO_LR_MULTIPLIER, False, 100.0),
            "auto": auto}


def learning_rate(method: TrainMethod, multiplier: float) -> float:
    return BASE_LEARNING_RATE[method] * multiplier


def trainer_spec(*, job_id: str, base_model_dir: str, training_file: str, validation_file: str | None,
                 method: TrainMethod, n_epochs: int, batch_size: int, learning_rate_multiplier: float,
                 max_steps: int | None, rank: int, alpha: int | None, target_modules: tuple[str, ...] | None,
                 seed: int, max_seq: int, output_dir: str, resume_from: str | None, checkpoint_every: int,
                 events_path: str) -> Mapping[str, Any]:
    """The JSON spec a trainer reads (plugins/trainers.md)."""
    return {
        "version": 1, "job_id": job_id, "base_model_dir": base_model_dir, "training_file": training_file,
        "validation_file": validation_file, "method": str(method),
        "hyperparameters": {"n_epochs": n_epochs, "batch_size": batch_size,
                            "learning_rate": learning_rate(method, learning_rate_multiplier), "max_steps": max_steps},
        "lora": {"rank": rank, "alpha": alpha or 2 * rank, "dropout": 0.0,
                 "target_modules": list(target_modules) if target_modules else None},
        "seed": seed, "max_seq": max_seq, "output_dir": output_dir, "resume_from": resume_from,
        "checkpoint_every": checkpoint_every, "events_path": events_path,
    }
