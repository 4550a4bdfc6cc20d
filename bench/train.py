"""What a fine-tuning job through hybridd costs over the trainer run by hand, and how well hybridd predicts the
Spark's training throughput. One run:

    .venv/bin/python bench/train.py [--quick]

1. The same job, on the same data, the same number of times each, alternating: the built-in trainer started
   directly from its spec (spawn to exit), and through a running hybridd (the create request to the moment the
   job reads `succeeded`, its model registered). Target: hybridd adds at most 10% + 2 s of wall time.
2. The predicted training tokens/s on a DGX Spark for NVIDIA's three published figures. Target: within ±30%.

Writes bench/results/train.json. Needs the training extra (scripts/setup.sh installs it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import openai

from hybridd.demo.launch import start_node
from hybridd.demo.tiny_hf import write_tiny_llama_pair
from hybridd.jobs.request import trainer_spec
from hybridd.jobs.trainer import trainer_argv
from hybridd.model.spec import model_spec
from hybridd.model.training import TrainMethod, TrainSettings, estimate_training
from hybridd.place.train import predict_train_tok_s, training_device
from hybridd.probe.hardware_profiles import load_hardware_profile
from hybridd.probe.model_profiles import load_profile, profile_header

HERE = Path(__file__).resolve().parent
OVERHEAD_FRACTION, OVERHEAD_S = 0.10, 2.0
SPEED_TOLERANCE = 0.30
# NVIDIA, "How NVIDIA DGX Spark's performance enables intensive AI tasks": sequence 2048, tokens/s.
SPARK_FIGURES = [("llama-3.2-3b", TrainMethod.FULL, 8, 82_739.2), ("llama-3.1-8b", TrainMethod.LORA, 4, 53_657.6),
                 ("llama-3.3-70b", TrainMethod.QLORA, 8, 5_079.04)]
SEED, RANK, MAX_SEQ = 11, 8, 256


def dataset(n: int) -> bytes:
    lines = [{"messages": [{"role": "user", "content": f"count to {i % 30}"},
                           {"role": "assistant", "content": " ".join(str(k) for k in range(i % 30 + 1))}]}
             for i in range(n)]
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def direct(folder: Path, hf: Path, data: Path, epochs: int, run: int) -> float:
    """Seconds from spawning the trainer to its exit with a result."""
    out = folder / f"direct-{run}"
    out.mkdir()
    spec = trainer_spec(job_id=f"ftjob-bench{run}", base_model_dir=str(hf), training_file=str(data),
                        validation_file=None, method=TrainMethod.LORA, n_epochs=epochs, batch_size=1,
                        learning_rate_multiplier=1.0, max_steps=None, rank=RANK, alpha=None, target_modules=None,
                        seed=SEED, max_seq=MAX_SEQ, output_dir=str(out / "out"), resume_from=None,
                        checkpoint_every=50, events_path=str(out / "events.jsonl"))
    spec_path = out / "spec.json"
    spec_path.write_text(json.dumps(spec))
    started = time.perf_counter()
    subprocess.run(trainer_argv((), spec_path), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    took = time.perf_counter() - started
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert events[-1]["type"] == "result", events[-1]
    return took


def through_hybridd(api: openai.OpenAI, file_id: str, epochs: int) -> tuple[float, str]:
    """Seconds from the create request to the job reading succeeded (polled every 20 ms), and its model id."""
    started = time.perf_counter()
    job = api.fine_tuning.jobs.create(model="tiny", training_file=file_id, seed=SEED,
                                      hyperparameters={"n_epochs": epochs, "batch_size": 1,
                                                       "learning_rate_multiplier": 1},
                                      extra_body={"hybridd": {"adapter": "lora", "rank": RANK, "max_seq": MAX_SEQ}})
    while (job := api.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        time.sleep(0.02)  # the benchmark's polling granularity, counted against hybridd
    took = time.perf_counter() - started
    assert job.status == "succeeded", job.error
    return took, str(job.fine_tuned_model)


def overhead(runs: int, examples: int, epochs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="hybridd-bench-train-") as tmp:
        folder = Path(tmp)
        hf, gguf = write_tiny_llama_pair(folder / "model")
        data = folder / "train.jsonl"
        data.write_bytes(dataset(examples))
        config = (f'[server]\nlisten = "127.0.0.1:0"\nlog_level = "warning"\n[node]\nname = "bench"\n'
                  f'ram_bytes = 200_000\n[[node.devices]]\nname = "budget0"\nmemory_bytes = 8_000_000_000\n'
                  f'[train]\ncheckpoint_every = 50\n[[models]]\nname = "tiny"\npath = "{gguf}"\n'
                  f'train_path = "{hf}"\nctx = 1024\n')
        node = start_node(config, folder / "node")
        try:
            api = openai.OpenAI(base_url=node.url + "/v1", api_key="unused", max_retries=0, timeout=60)
            upload = api.files.create(file=("train.jsonl", data.read_bytes()), purpose="fine-tune")
            plain, served = [], []
            for run in range(runs):  # alternating, so drift on this machine hits both alike
                plain.append(direct(folder, hf, data, epochs, run))
                took, model = through_hybridd(api, upload.id, epochs)
                served.append(took)
                print(f"run {run + 1}/{runs}: direct {plain[-1]:.2f} s, through hybridd {took:.2f} s ({model})")
        finally:
            node.stop()
    base, ours = statistics.median(plain), statistics.median(served)
    allowed = OVERHEAD_FRACTION * base + OVERHEAD_S
    return {"runs": runs, "examples": examples, "epochs": epochs, "steps": examples * epochs,
            "direct_s": [round(x, 3) for x in plain], "hybridd_s": [round(x, 3) for x in served],
            "direct_median_s": round(base, 3), "hybridd_median_s": round(ours, 3),
            "added_s": round(ours - base, 3), "allowed_s": round(allowed, 3), "met": ours - base <= allowed}


def spark_speeds() -> list[dict[str, Any]]:
    spark = load_hardware_profile("dgx-spark").hardware()
    device = training_device(spark)
    assert device is not None
    rows = []
    for name, method, batch, measured in SPARK_FIGURES:
        header = profile_header(load_profile(name))
        spec = model_spec(header.metadata, header.tensors)
        estimate = estimate_training(spec, header.tensors, TrainSettings(method, seq=2048, batch=batch))
        predicted = predict_train_tok_s(spec, estimate, device, spark.bandwidth_of(device.name)) or 0.0
        error = predicted / measured - 1
        rows.append({"model": name, "method": str(method), "batch": batch, "measured_tok_s": measured,
                     "predicted_tok_s": round(predicted, 1), "error": round(error, 4),
                     "met": abs(error) <= SPEED_TOLERANCE})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter runs (a smoke test)")
    args = parser.parse_args()
    runs, examples, epochs = (2, 20, 2) if args.quick else (3, 60, 5)
    result = {"machine": platform.node(), "python": platform.python_version(), "cpus": os.cpu_count(),
              "overhead": overhead(runs, examples, epochs), "spark_speed": spark_speeds()}
    cost = result["overhead"]
    print(f"\ndirect {cost['direct_median_s']:.2f} s, through hybridd {cost['hybridd_median_s']:.2f} s: "
          f"+{cost['added_s']:.2f} s (allowed {cost['allowed_s']:.2f} s) -> {'met' if cost['met'] else 'MISSED'}")
    for row in result["spark_speed"]:
        print(f"{row['model']:<14} {row['method']:<6} batch {row['batch']}: predicted {row['predicted_tok_s']:>9,.0f}"
              f" tok/s, measured {row['measured_tok_s']:>9,.0f} ({row['error']:+.1%}) -> "
              f"{'met' if row['met'] else 'MISSED'}")
    if not args.quick:
        (HERE / "results").mkdir(exist_ok=True)
        (HERE / "results" / "train.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0 if cost["met"] and all(r["met"] for r in result["spark_speed"]) else 1


if __name__ == "__main__":
    sys.exit(main())
