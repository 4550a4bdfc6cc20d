"""The demo's third part: fine-tune a tiny Llama from the desktop; the job trains on the peer (only it has the
checkpoint), the adapter comes back, and the desktop answers with the fine-tuned model on its own engine.

It needs the training extra; without it the demo says how to add it and skips this part.
"""

from __future__ import annotations

import importlib.util
import json
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from hybridd.demo.tiny_hf import write_tiny_llama_pair  # numpy and gguf at import; tokenizers only when it runs

MODEL = "tiny-llama"
MAX_STEPS = 20
EXTRA = ("torch", "transformers", "peft", "trl")
INSTALL = "pip install 'hybridd[train]'  (with the CPU-only torch: pip install 'torch==2.13.0+cpu' 'hybridd[train]')"
FINISHED = ("succeeded", "failed", "cancelled")


def missing_extra() -> list[str]:
    """The training extra's packages that cannot be imported here."""
    return [name for name in EXTRA if importlib.util.find_spec(name) is None]


def skipped_line(missing: list[str]) -> str:
    return f"fine-tuning: skipped, the training extra is not installed (no {', '.join(missing)}); add it: {INSTALL}"


def build_model(folder: Path) -> tuple[Path, Path]:
    """The tiny Llama as an HF checkpoint (the peer trains it) and as a GGUF (both nodes serve it)."""
    return write_tiny_llama_pair(folder)


def model_entry(model: tuple[Path, Path], trains: bool) -> str:
    """The second [[models]] entry of a node's config; only a node that trains it gets the checkpoint."""
    hf, gguf = model
    train_path = f'train_path = "{hf}"\n' if trains else ""
    return f'[[models]]\nname = "{MODEL}"\npath = "{gguf}"\nctx = 1024\n{train_path}'


def dataset(n: int = 16) -> bytes:
    """Chat examples that teach counting: the kind of JSONL OpenAI's fine-tuning takes."""
    lines = [{"messages": [{"role": "user", "content": f"count to {i}"},
                           {"role": "assistant", "content": " ".join(str(k) for k in range(1, i + 1))}]}
             for i in range(1, n + 1)]
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def _call(url: str, body: bytes | None = None, content_type: str = "application/json",
          timeout: float = 60) -> tuple[dict[str, Any], dict[str, str]]:
    request = urllib.request.Request(url, data=body, method="GET" if body is None else "POST",
                                     headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response), dict(response.headers)
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"{url}: {exc.read().decode(errors='replace')}") from exc


def _post(url: str, body: Any) -> tuple[dict[str, Any], dict[str, str]]:
    return _call(url, json.dumps(body).encode())


def upload(desk_url: str, name: str, content: bytes) -> dict[str, Any]:
    """POST /v1/files as the OpenAI SDK does it: multipart, purpose fine-tune."""
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: application/jsonl\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    stored, _ = _call(desk_url + "/v1/files", body, f"multipart/form-data; boundary={boundary}")
    return stored


def run_finetune(desk_url: str, out: Any, timeout: float = 180.0) -> None:
    """Upload, fine-tune (it lands on the peer), follow it, and ask the fine-tuned model on the desktop."""
    out(f"fine-tuning {MODEL} (a tiny Llama built here): the peer has its checkpoint, the desktop only its GGUF")
    stored = upload(desk_url, "count.jsonl", dataset())
    out(f"  uploaded {stored['filename']} ({stored['bytes']} bytes) as {stored['id']}")
    started = time.monotonic()
    job, _ = _post(desk_url + "/v1/fine_tuning/jobs", {
        "model": MODEL, "training_file": stored["id"], "suffix": "demo",
        "hyperparameters": {"n_epochs": 2, "batch_size": 1}, "hybridd": {"max_steps": MAX_STEPS}})
    own = job["hybridd"]
    out(f"  job {job['id']}: trains on {own['placement']}")
    out(f"  why:    {own['reason']}")
    job = _follow(desk_url, job["id"], out, started + timeout)
    if job["status"] != "succeeded":
        raise RuntimeError(f"the fine-tuning job {job['status']}: {(job.get('error') or {}).get('message')}")
    model = job["fine_tuned_model"]
    out(f"  succeeded in {time.monotonic() - started:.1f} s: {model} (the adapter came back to the desktop)")
    asked = time.monotonic()
    reply, headers = _post(desk_url + "/v1/chat/completions", {
        "model": model, "max_tokens": 12, "temperature": 0, "messages": [{"role": "user", "content": "count to 3"}]})
    out(f"{model}: ran on {headers['x-hybridd-placement']} in {time.monotonic() - asked:.1f} s")
    out(f"  why:    {headers['x-hybridd-reason']}")
    # Random weights and 20 steps: the answer is the shape of one, not a good one.
    out(f"  answer: {reply['choices'][0]['message']['content']!r}\n")


def _follow(desk_url: str, job_id: str, out: Any, deadline: float) -> dict[str, Any]:
    """Print each step the trainer reports until the job finishes; the finished job."""
    base = f"{desk_url}/v1/fine_tuning/jobs/{job_id}"
    last = ""
    while True:
        job, _ = _call(base)  # the job first: once it is seen finished, every event it wrote is listed below
        while True:
            page, _ = _call(f"{base}/events?order=asc&limit=100{last}")
            for event in page["data"]:
                data = event.get("data") or {}
                if event.get("type") == "metrics":
                    loss, speed = data.get("train_loss"), data.get("tokens_per_s")
                    out(f"  step {data['step']}/{data['total_steps']}"
                        + (f"  loss {loss:.4f}" if isinstance(loss, int | float) else "")
                        + (f"  {speed:.0f} tok/s" if isinstance(speed, int | float) else ""))
            if page["data"]:
                last = f"&after={page['data'][-1]['id']}"
            if not page["has_more"]:
                break
        if job["status"] in FINISHED:
            return job
        if time.monotonic() > deadline:
            raise RuntimeError(f"the fine-tuning job {job_id} did not finish in time ({job['status']})")
        time.sleep(0.5)  # polling the desktop's copy of the job, with a deadline
