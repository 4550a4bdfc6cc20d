"""`hybridd demo`: a desktop node and a peer node on this machine, paired with a one-time code; a short and a
long request for the same small real model show where each runs and why; then (with the training extra) a
fine-tune asked on the desktop trains on the peer and its model answers on the desktop (demo/finetune.py)."""

from __future__ import annotations

import json
import os
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from hybridd.config import MANAGED_KINDS, Config, state_dir
from hybridd.demo import finetune
from hybridd.demo.launch import RunningNode, start_node
from hybridd.demo.model import demo_model
from hybridd.engine.choice import default_engine
from hybridd.model.memory import RunSettings, estimate_memory
from hybridd.model.spec import model_spec
from hybridd.place.devices import Device
from hybridd.place.fit import fit_model
from hybridd.probe.gguf_file import read_gguf_header

PROMPT = "The three primary colors of light are"
LONG_CTX = 32768


def _call(url: str, body: Any = None, timeout: float = 300) -> tuple[dict[str, Any], dict[str, str]]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response), dict(response.headers)
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"{url}: {exc.read().decode(errors='replace')}") from exc


def _config(name: str, role: str, model: tuple[str, Path, dict[str, str]], budget: int, ram: int,
            engine: str) -> str:
    model_id, path, options = model
    opts = ", ".join(f'{k} = "{v}"' for k, v in options.items())
    lan = 'lan_listen = "127.0.0.1:0"' if role == "peer" else ""
    return f"""
[server]
listen = "127.0.0.1:0"
log_level = "warning"
{lan}
[node]
name = "{name}"
role = "{role}"
hardware = "{'dgx-spark' if role == 'peer' else 'desktop-4090-5070ti'}"
ram_bytes = {ram}
[[node.devices]]
name = "{'NVIDIA GB10' if role == 'peer' else 'simulated GPU'}"
memory_bytes = {budget}
bandwidth_bytes_s = {'2.73e11' if role == 'peer' else '1.0e12'}
unified = {'true' if role == 'peer' else 'false'}
[[models]]
name = "{model_id}"
path = "{path}"
engine = "{engine}"
ctx = 4096
options = {{ {opts} }}
"""


def _budget(path: Path) -> tuple[int, int, int]:
    """GPU bytes the model needs at 4k and at the long context, and its host RAM, by hybridd's own estimate."""
    header = read_gguf_header(path)
    spec = model_spec(header.metadata, header.tensors)
    short, long = (estimate_memory(spec, RunSettings(ctx=c, flash_attn=False)) for c in (4096, LONG_CTX))
    # Room for what llama.cpp keeps in RAM anyway (the input layer, the logits), not for offloaded layers.
    host = long.token_embd_bytes + long.output_buffer_bytes + 16 * 2**20
    big = [Device("gpu", 2**40, 2**40)]
    return (fit_model(short, big, host).devices[0].bytes_placed, fit_model(long, big, host).devices[0].bytes_placed,
            host)


def run_demo(out: Any = print) -> int:
    """Run the demo, printing as it goes; 0 when both requests were answered where expected."""
    # The engine `hybridd serve` would choose; the demo model's options are that engine's.
    override = os.environ.get("HYBRIDD_ENGINE")
    engine, _ = default_engine(Config(), override if override in MANAGED_KINDS else None)
    model = demo_model(state_dir() / "models", engine)
    short_bytes, long_bytes, host_bytes = _budget(model[1])
    out(f"model: {model[0]} ({model[1].name}); on a GPU it needs {short_bytes / 2**30:.2f} GiB at 4k context and "
        f"{long_bytes / 2**30:.2f} GiB at {LONG_CTX}")
    nodes: list[RunningNode] = []
    missing = finetune.missing_extra()
    with tempfile.TemporaryDirectory(prefix="hybridd-demo-") as folder:
        try:
            peer_config = _config("spark-demo", "peer", model, long_bytes * 8, 0, engine)
            desk_config = _config("desk-demo", "desktop", model, (short_bytes + long_bytes) // 2, host_bytes, engine)
            if not missing:  # the model to fine-tune: the peer has its checkpoint, the desktop only its GGUF
                tiny = finetune.build_model(Path(folder) / "tiny")
                peer_config += finetune.model_entry(tiny, trains=True)
                desk_config += finetune.model_entry(tiny, trains=False)
            out("starting a peer node (dgx-spark profile, simulated 8x budget) and a desktop node "
                "(budget between the two)...")
            peer = start_node(peer_config, Path(folder) / "peer")
            nodes.append(peer)
            desk = start_node(desk_config, Path(folder) / "desk")
            nodes.append(desk)
            window, _ = _call(peer.url + "/hybridd/v1/pair/open", {})
            out(f"peer opened a pairing window: code {window['code'][:4]} {window['code'][4:]}")
            target = peer.lan_url.removeprefix("https://")
            paired, _ = _call(desk.url + "/hybridd/v1/pair/connect", {"target": target, "code": window["code"]})
            out(f"desktop paired with {paired['name']} over SPAKE2; from now on only its pinned certificate is "
                "trusted")
            _wait_for_link(desk.url)
            out("control link up (mutual TLS)\n")
            for label, hints in (("short context", {}), (f"long context ({LONG_CTX} tokens)",
                                                        {"min_ctx": LONG_CTX})):
                # Gemma 3 270M is a base model: it continues text rather than chatting.
                body = {"model": model[0], "max_tokens": 32, "temperature": 0, "prompt": PROMPT}
                if hints:
                    body["hybridd"] = hints
                started = time.monotonic()
                reply, headers = _call(desk.url + "/v1/completions", body)
                text = PROMPT + reply["choices"][0]["text"].replace("\n", " ")
                out(f"{label}: ran on {headers['x-hybridd-placement']} in {time.monotonic() - started:.1f} s")
                out(f"  why:    {headers['x-hybridd-reason']}")
                out(f"  answer: {text[:160]}\n")
            if missing:
                out(finetune.skipped_line(missing))
            else:
                finetune.run_finetune(desk.url, out)
            return 0
        finally:
            for node in reversed(nodes):
                node.stop()


def _wait_for_link(desk_url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        peers, _ = _call(desk_url + "/hybridd/v1/peers")
        if any(p["link"] == "up" and p["models"] for p in peers["paired"]):
            return
        time.sleep(0.1)  # polling the desktop's view of the link, with a deadline
    raise RuntimeError(f"the link to the peer did not come up within {timeout:g} s")
