"""The web page's latency and throughput on this machine: ``featgender serve`` on 127.0.0.1,
called through gradio_client as a browser's requests are.

p50/p95 of one photo's /analyse request, one client at a time; then ``--clients``
concurrent clients sending photos for at most ``--seconds`` or ``--requests`` each:
requests/s and their p50/p95 (requests queue: one runs at a time on the CPU).

    python benchmarks/serve_latency.py --model models/celeba_10k-dlib-logreg.joblib --photo group.jpg
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def timed_requests(url: str, photo: Path, count: int, deadline: float) -> list[float]:
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    seconds = []
    while len(seconds) < count and time.perf_counter() < deadline:
        started = time.perf_counter()
        client.predict(handle_file(str(photo)), 0.5, api_name="/analyse")
        seconds.append(time.perf_counter() - started)
    return seconds


def summary(seconds: list[float]) -> dict:
    return {
        "requests": len(seconds),
        "p50_s": round(statistics.median(seconds), 3),
        "p95_s": round(float(np.percentile(seconds, 95)), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--photo", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=30, help="per client")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=120)
    args = parser.parse_args()

    from featgender.app import serve

    blocks, url, work_dir = serve(args.model, port=_free_port(), block=False)
    try:
        timed_requests(url, args.photo, 3, time.perf_counter() + 60)  # warm-up
        one = summary(timed_requests(url, args.photo, args.requests, time.perf_counter() + args.seconds))
        print(json.dumps({"one_client": one}), flush=True)
        deadline = time.perf_counter() + args.seconds
        started = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            runs = list(
                pool.map(lambda _: timed_requests(url, args.photo, args.requests, deadline), range(args.clients))
            )
        elapsed = time.perf_counter() - started
        every = [second for run in runs for second in run]
        print(
            json.dumps({"clients": args.clients, **summary(every), "requests_per_s": round(len(every) / elapsed, 2)}),
            flush=True,
        )
    finally:
        blocks.close()
        shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
