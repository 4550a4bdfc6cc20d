"""What hybridd's pass-through costs: the same workloads straight to an engine and through hybridd, one run.

    .venv/bin/python bench/proxy_overhead.py [--quick]

Prints both and the ratios, and writes bench/results/proxy_overhead.json. Targets: under 1 ms added to p50
time-to-first-token, at least 90% of direct streaming throughput. It also streams the same answers asked as
Anthropic Messages (/v1/messages over the chat engine, translated chunk by chunk) and reports what the
translation adds against the pass-through figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

HERE = Path(__file__).resolve().parent
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def start_upstream(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    port_file = tmp / "port"
    proc = subprocess.Popen([sys.executable, str(HERE / "fake_engine.py"), str(port_file)])
    deadline = time.monotonic() + 30
    while not port_file.exists() or not port_file.read_text():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError("fake engine did not start")
        time.sleep(0.02)
    return proc, f"http://127.0.0.1:{port_file.read_text()}"


def start_hybridd(tmp: Path, upstream: str) -> tuple[subprocess.Popen[bytes], str]:
    config = tmp / "config.toml"
    config.write_text(f'[server]\nlisten = "127.0.0.1:0"\nlog_level = "warning"\n'
                      f'[[models]]\nname = "m"\nbase_url = "{upstream}"\n')
    sock_path = tmp / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(sock_path))
    notify.settimeout(30)
    env = {**os.environ, "NOTIFY_SOCKET": str(sock_path)}
    proc = subprocess.Popen([sys.executable, "-m", "hybridd", "serve", "--config", str(config)], env=env)
    with notify:
        while True:
            fields = dict(line.split("=", 1) for line in notify.recv(4096).decode().splitlines() if "=" in line)
            if fields.get("READY") == "1":
                return proc, fields["STATUS"].rsplit(" ", 1)[-1]


async def run_concurrently(n: int, concurrency: int, one: Callable[[], Awaitable[float]]) -> list[float]:
    results: list[float] = []
    remaining = iter(range(n))

    async def worker() -> None:
        for _ in remaining:
            results.append(await one())

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


async def measure(base: str, scale: float) -> dict[str, float]:
    url = base + "/v1/chat/completions"
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        body = json.dumps(CHAT).encode()
        headers = {"Content-Type": "application/json"}

        async def plain() -> float:
            started = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                assert response.status == 200
            return time.perf_counter() - started

        async def first_token(tokens: int) -> tuple[float, float, int]:
            stream_body = json.dumps({**CHAT, "stream": True, "max_tokens": tokens}).encode()
            started = time.perf_counter()
            ttft = 0.0
            events = 0
            async with session.post(url, data=stream_body, headers=headers) as response:
                assert response.status == 200
                async for data in response.content.iter_any():
                    if not events:
                        ttft = time.perf_counter() - started
                    events += data.count(b"\n\n")
            return ttft, time.perf_counter() - started, events

        await run_concurrently(int(200 * scale), 8, plain)  # warm up connections on both paths
        c1 = await run_concurrently(int(1000 * scale), 1, plain)
        started = time.perf_counter()
        c32 = await run_concurrently(int(4000 * scale), 32, plain)
        rps = len(c32) / (time.perf_counter() - started)

        ttfts = [(await first_token(16))[0] for _ in range(int(500 * scale))]
        tokens = int(20000 * scale)
        one_stream = await first_token(tokens)
        started = time.perf_counter()
        many = await asyncio.gather(*(first_token(tokens // 4) for _ in range(32)))
        aggregate = sum(events for _, _, events in many) / (time.perf_counter() - started)
    return {
        "latency_c1_p50_ms": statistics.median(c1) * 1e3,
        "latency_c1_p99_ms": percentile(c1, 0.99) * 1e3,
        "latency_c32_p50_ms": statistics.median(c32) * 1e3,
        "latency_c32_p99_ms": percentile(c32, 0.99) * 1e3,
        "requests_per_s_c32": rps,
        "ttft_p50_ms": statistics.median(ttfts) * 1e3,
        "ttft_p99_ms": percentile(ttfts, 0.99) * 1e3,
        "chunks_per_s_1_stream": one_stream[2] / one_stream[1],
        "chunks_per_s_32_streams": aggregate,
    }


async def measure_translated(base: str, scale: float) -> dict[str, float]:
    """The same streams asked as Anthropic Messages: hybridd translates each chat chunk into its events as it passes.
    A token is one content_block_delta event."""
    url = base + "/v1/messages"
    headers = {"Content-Type": "application/json", "anthropic-version": "2023-06-01"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def first_token(tokens: int) -> tuple[float, float, int]:
            body = json.dumps({"model": "m", "max_tokens": tokens, "stream": True,
                               "messages": [{"role": "user", "content": "hi"}]}).encode()
            started = time.perf_counter()
            ttft = 0.0
            deltas = 0
            async with session.post(url, data=body, headers=headers) as response:
                assert response.status == 200, await response.text()
                async for data in response.content.iter_any():
                    found = data.count(b"event: content_block_delta")
                    if found and not deltas:
                        ttft = time.perf_counter() - started
                    deltas += found
            return ttft, time.perf_counter() - started, deltas

        for _ in range(int(50 * scale) or 1):
            await first_token(4)  # warm up
        ttfts = [(await first_token(16))[0] for _ in range(int(500 * scale))]
        tokens = int(20000 * scale)
        one_stream = await first_token(tokens)
        started = time.perf_counter()
        many = await asyncio.gather(*(first_token(tokens // 4) for _ in range(32)))
        aggregate = sum(deltas for _, _, deltas in many) / (time.perf_counter() - started)
    return {"ttft_p50_ms": statistics.median(ttfts) * 1e3, "ttft_p99_ms": percentile(ttfts, 0.99) * 1e3,
            "chunks_per_s_1_stream": one_stream[2] / one_stream[1], "chunks_per_s_32_streams": aggregate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the work, for a smoke run")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "proxy_overhead.json")
    args = parser.parse_args()
    scale = 0.1 if args.quick else 1.0
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        upstream_proc, upstream = start_upstream(tmp)
        hybridd_proc, hybridd = start_hybridd(tmp, upstream)
        try:
            direct = asyncio.run(measure(upstream, scale))
            proxied = asyncio.run(measure(hybridd, scale))
            translated = asyncio.run(measure_translated(hybridd, scale))
        finally:
            for proc in (hybridd_proc, upstream_proc):
                proc.terminate()
                proc.wait(timeout=30)
    higher_is_better = {"requests_per_s_c32", "chunks_per_s_1_stream", "chunks_per_s_32_streams"}
    print(f"{'metric':28} {'direct':>12} {'via hybridd':>12} {'ratio':>8}")
    for key in direct:
        ratio = proxied[key] / direct[key] if direct[key] else float("nan")
        mark = "(higher is better)" if key in higher_is_better else ""
        print(f"{key:28} {direct[key]:12.2f} {proxied[key]:12.2f} {ratio:8.2f} {mark}")
    added_ttft = proxied["ttft_p50_ms"] - direct["ttft_p50_ms"]
    kept_1 = proxied["chunks_per_s_1_stream"] / direct["chunks_per_s_1_stream"]
    kept_32 = proxied["chunks_per_s_32_streams"] / direct["chunks_per_s_32_streams"]
    verdict = {
        "added_ttft_p50_ms": added_ttft, "ttft_target_met": added_ttft < 1.0,
        "throughput_kept_1_stream": kept_1, "throughput_kept_32_streams": kept_32,
        "throughput_target_met": min(kept_1, kept_32) >= 0.9,
    }
    print(f"\nadded p50 TTFT: {added_ttft:.3f} ms (target < 1 ms: {'met' if verdict['ttft_target_met'] else 'MISSED'})")
    print(f"streaming throughput kept: {kept_1:.0%} (1 stream), {kept_32:.0%} (32 streams) "
          f"(target >= 90%: {'met' if verdict['throughput_target_met'] else 'MISSED'})")
    print(f"\n{'translated stream (/v1/messages)':34} {'pass-through':>12} {'translated':>12} {'ratio':>8}")
    for key, value in translated.items():
        ratio = value / proxied[key] if proxied[key] else float("nan")
        print(f"{key:34} {proxied[key]:12.2f} {value:12.2f} {ratio:8.2f}")
    verdict["translated_added_ttft_p50_ms"] = translated["ttft_p50_ms"] - direct["ttft_p50_ms"]
    verdict["translated_throughput_kept_1_stream"] = translated["chunks_per_s_1_stream"] / \
        direct["chunks_per_s_1_stream"]
    verdict["translated_throughput_kept_32_streams"] = translated["chunks_per_s_32_streams"] / \
        direct["chunks_per_s_32_streams"]
    print(f"translated: added p50 TTFT {verdict['translated_added_ttft_p50_ms']:.3f} ms over the engine direct; "
          f"throughput kept {verdict['translated_throughput_kept_1_stream']:.0%} (1 stream), "
          f"{verdict['translated_throughput_kept_32_streams']:.0%} (32 streams)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "quick": args.quick, "direct": direct, "via_hybridd": proxied, "translated_messages": translated,
        "verdict": verdict,
    }, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
