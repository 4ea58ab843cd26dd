"""Durations measured in this process: steps, Task sends, DICOMweb and inference requests.

Prometheus histograms in a registry of their own (:data:`REGISTRY`), which ``/metrics`` adds to
the counts it reads from the store. Labels are low-cardinality on purpose: a process key, an
operation, an outcome; never a Task, instance, study or model-input identifier. The
histograms are process-wide (prometheus-client's model): every bridge in one process, as in
tests, adds to the same series.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Histogram

__all__ = [
    "DICOMWEB_SECONDS",
    "INFERENCE_SECONDS",
    "REGISTRY",
    "SEND_SECONDS",
    "STEP_SECONDS",
    "Timing",
    "timed",
]

REGISTRY = CollectorRegistry(auto_describe=True)

# From a few milliseconds (a step's transaction) to ten minutes (a large model on a CPU).
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

STEP_SECONDS = Histogram(
    "dsf_bridge_step_duration_seconds",
    "Service task steps: the handler call and the transaction that records its outcome",
    ["process", "outcome"],
    buckets=_BUCKETS,
    registry=REGISTRY,
)
SEND_SECONDS = Histogram(
    "dsf_bridge_send_duration_seconds",
    "Task POSTs to a DSF FHIR server (the target process's key)",
    ["process", "outcome"],
    buckets=_BUCKETS,
    registry=REGISTRY,
)
DICOMWEB_SECONDS = Histogram(
    "dsf_bridge_dicomweb_request_duration_seconds",
    "DICOMweb requests (each try) by operation",
    ["operation", "outcome"],
    buckets=_BUCKETS,
    registry=REGISTRY,
)
INFERENCE_SECONDS = Histogram(
    "dsf_bridge_inference_request_duration_seconds",
    "Open Inference Protocol infer requests, retries included",
    ["outcome"],
    buckets=_BUCKETS,
    registry=REGISTRY,
)


@dataclass
class Timing:
    """The outcome a timed block reports: ``ok`` unless it raised (``error``) or the block
    named another one."""

    outcome: str = "ok"


@contextmanager
def timed(histogram: Histogram, since: float | None = None, **labels: str) -> Iterator[Timing]:
    """Observe the block's duration in ``histogram`` with ``labels`` and its outcome; from
    ``since`` (``time.perf_counter()``) when the work began before the block."""
    timing = Timing()
    started = time.perf_counter() if since is None else since
    try:
        yield timing
    except BaseException:
        if timing.outcome == "ok":
            timing.outcome = "error"
        raise
    finally:
        histogram.labels(outcome=timing.outcome, **labels).observe(time.perf_counter() - started)
