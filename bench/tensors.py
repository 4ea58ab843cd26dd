"""Benchmark: one 3-D inference request as JSON tensors against binary tensors, side by side.

The request is what a providing site sends for a CT series: a synthetic CT-like volume (INT16
Hounsfield units: air around a body of fat, muscle and bone, with noise) of ``--slices`` slices
(at least 200) of ``--size`` x ``--size`` pixels and its spacing, to the reference
tissue-composition model served by real KServe (``scripts/setup-kserve.sh``), through our OIP
v2 client (``dsf_bridge.omi.inference``) with ``tensor_encoding`` ``json`` and ``binary``.

The two encodings run in alternating blocks (``--rounds`` rounds, ``--block`` requests each,
the order swapped every round) so that a noisy machine slows both alike. Per request: wall
time, and CPU time of this client process (``resource.getrusage``: encoding, sending, decoding,
the worker threads included; the server's CPU is not counted). Peak memory is measured apart,
in one extra request per encoding under ``tracemalloc`` (which slows allocation, so it is never
timed): the most memory this process's Python and numpy allocations held at once during the
request, volume excluded (it exists before).

Run: ``python bench/tensors.py [--slices 200] [--size 512] [--rounds 3] [--block 1]``. Prints
``key=value`` lines (medians per request), the ratios json/binary, last
``json_vs_binary_wall=`` and ``json_vs_binary_peak_memory=``. Both encodings must return the
same measurements, or the benchmark fails.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from dsf_bridge.omi.inference import (
    HttpInferenceClient,
    InferenceResult,
    Tensor,
    TensorEncoding,
)
from dsf_bridge.sandbox.components import (
    ComponentMissingError,
    KServeProcess,
)

MODEL = "tissue-composition"
ENCODINGS: tuple[TensorEncoding, ...] = ("json", "binary")


def synthetic_volume(slices: int, size: int, seed: int = 12) -> np.ndarray:
    """INT16 HU: air, an elliptic body of fat with a muscle core and a bone ring, and noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    centre = (size - 1) / 2
    r = np.hypot((x - centre) / (0.42 * size), (y - centre) / (0.32 * size))
    base = np.full((size, size), -1000.0)
    base[r < 1.0] = -100.0  # adipose
    base[r < 0.7] = 45.0  # muscle
    base[(r > 0.25) & (r < 0.3)] = 700.0  # bone
    volume = np.empty((slices, size, size), dtype=np.int16)
    for index in range(slices):
        noise = rng.normal(0.0, 20.0, (size, size))
        volume[index] = np.clip(base + noise, -1024, 3071).astype(np.int16)
    return volume


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _request(client: HttpInferenceClient, inputs: list[Tensor]) -> InferenceResult:
    return await client.infer(MODEL, inputs, outputs=["body_volume_ml", "muscle_volume_ml"])


async def _measure(
    base_url: str, inputs: list[Tensor], rounds: int, block: int
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, InferenceResult]]:
    wall: dict[str, list[float]] = {encoding: [] for encoding in ENCODINGS}
    cpu: dict[str, list[float]] = {encoding: [] for encoding in ENCODINGS}
    results: dict[str, InferenceResult] = {}
    clients = {
        encoding: HttpInferenceClient(
            base_url, timeout=900.0, tensor_encoding=encoding, max_request_bytes=8 << 30
        )
        for encoding in ENCODINGS
    }
    try:
        for encoding in ENCODINGS:  # warm-up: connections, imports, the model's first call
            results[encoding] = await _request(clients[encoding], inputs)
        for index in range(rounds):
            order = ENCODINGS if index % 2 == 0 else ENCODINGS[::-1]
            for encoding in order:
                for _ in range(block):
                    cpu_before, started = _cpu(), time.perf_counter()
                    await _request(clients[encoding], inputs)
                    wall[encoding].append(time.perf_counter() - started)
                    cpu[encoding].append(_cpu() - cpu_before)
    finally:
        for client in clients.values():
            await client.aclose()
    return wall, cpu, results


async def _peak_memory(base_url: str, inputs: list[Tensor], encoding: TensorEncoding) -> int:
    async with HttpInferenceClient(
        base_url, timeout=900.0, tensor_encoding=encoding, max_request_bytes=8 << 30
    ) as client:
        await _request(client, inputs)  # connection and first-use allocations outside
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            floor = tracemalloc.get_traced_memory()[0]
            await _request(client, inputs)
            return tracemalloc.get_traced_memory()[1] - floor
        finally:
            tracemalloc.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=200, help="slices (at least 200)")
    parser.add_argument("--size", type=int, default=512, help="rows and columns per slice")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument("--block", type=int, default=1, help="requests per encoding per round")
    args = parser.parse_args()
    if args.slices < 200:
        parser.error("--slices must be at least 200 (a 3-D request worth measuring)")

    volume = synthetic_volume(args.slices, args.size)
    inputs = [
        Tensor("hu", "INT16", volume),
        Tensor.of("spacing_mm", [1.0, 0.7, 0.7], "FP32"),
    ]
    with tempfile.TemporaryDirectory(prefix="bench-tensors-") as workdir:
        server = KServeProcess(Path(workdir))
        try:
            server.start()
        except ComponentMissingError as exc:
            print(exc, file=sys.stderr)
            return 2
        with server:
            wall, cpu, results = asyncio.run(
                _measure(server.base_url, inputs, args.rounds, args.block)
            )
            peak = {
                encoding: asyncio.run(_peak_memory(server.base_url, inputs, encoding))
                for encoding in ENCODINGS
            }
    for name in ("body_volume_ml", "muscle_volume_ml"):
        if not np.allclose(results["json"][name].data, results["binary"][name].data):
            print(f"the encodings disagree on {name}", file=sys.stderr)
            return 1

    median_wall = {encoding: statistics.median(wall[encoding]) for encoding in ENCODINGS}
    median_cpu = {encoding: statistics.median(cpu[encoding]) for encoding in ENCODINGS}
    print(f"slices={args.slices}")
    print(f"rows={args.size}")
    print(f"columns={args.size}")
    print(f"tensor_bytes={volume.nbytes}")
    print(f"requests_per_encoding={args.rounds * args.block}")
    for encoding in ENCODINGS:
        print(f"{encoding}_wall_seconds={median_wall[encoding]:.3f}")
        print(f"{encoding}_cpu_seconds={median_cpu[encoding]:.3f}")
        print(f"{encoding}_peak_memory_bytes={peak[encoding]}")
    print(f"json_vs_binary_cpu={median_cpu['json'] / median_cpu['binary']:.1f}")
    print(f"json_vs_binary_wall={median_wall['json'] / median_wall['binary']:.1f}")
    print(f"json_vs_binary_peak_memory={peak['json'] / peak['binary']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
