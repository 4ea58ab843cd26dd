"""The statistics a consortium inference request returns: per-site aggregates and their pooling.

A data site runs a model on the studies of its cohort and sends back only what this module
computes from the results: per numeric measurement n, mean, standard deviation, median and
quartiles; per classification the count of each class. Nothing here sees a study or patient
identifier: the inputs are bare values and labels. Pure Python and numpy, no I/O, so that the
privacy rules below can be tested exhaustively without a network.

Privacy rules (``docs/consortium.md``, "Privacy rules"):

- **k rule.** No figure leaves a site that was computed from fewer than ``k`` studies. ``k`` is
  the larger of the site's own setting (default :data:`DEFAULT_K`) and the coordinator's
  request (:func:`effective_k`), so a coordinator can raise it, never lower it. A suppressed
  cell carries no number, only ``suppressed: true``.
- **Complementary suppression.** A class-count table publishes its total (the classification's
  ``n``); with a single suppressed class that class would follow by subtraction. So whenever a
  class is suppressed, further classes (smallest first) are suppressed with it until at least
  two are suppressed *and* together they hold at least ``k`` studies: the coordinator learns
  only their sum, itself a figure of at least ``k`` studies. When that is impossible the whole
  table is suppressed.
- **Obfuscation.** Optionally, every published count is obfuscated the way the MII feasibility
  plugin does it (:class:`LaplaceCountObfuscator`). Suppression is decided on the true counts.

Pooling (:func:`merge`): the pooled mean and standard deviation are exact, combined from each
site's (n, mean, sd) with the parallel-variance formula of Chan, Golub and LeVeque; the same as
computing over all studies at once, up to floating point. Pooled quartiles cannot be exact from
per-site quartiles; they are the n-weighted mean of the sites' quartiles and marked
approximate. :func:`aggregates_from_json` is the coordinator's strict reading of what a site
sent, so that a broken or hostile answer is refused before anything of it is stored.
"""

from __future__ import annotations

import enum
import math
import random
import secrets
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

__all__ = [
    "DEFAULT_K",
    "Aggregate",
    "ClassCounts",
    "ConsortiumResult",
    "CountObfuscator",
    "LaplaceCountObfuscator",
    "NumericAggregate",
    "PooledClassCounts",
    "PooledNumeric",
    "SiteAnswer",
    "SiteStatus",
    "aggregates_from_json",
    "class_counts",
    "effective_k",
    "merge",
    "numeric_aggregate",
    "pool_moments",
    "quartile_minimum",
]

# The default and the usual small-cell threshold of German research data centres.
DEFAULT_K = 5


class SiteStatus(enum.StrEnum):
    """How a data site's part of a consortium request ended, as the merged result names it."""

    DONE = "done"
    # The site ran, but every cell it had fell under k: it answered, with nothing to show.
    SUPPRESSED = "suppressed"
    REFUSED = "refused"
    FAILED = "failed"
    TIMED_OUT = "timed-out"


class CountObfuscator(Protocol):
    """Turns a true count into the count a site publishes."""

    def obfuscate(self, count: int) -> int: ...


class LaplaceCountObfuscator:
    """Laplace noise, rounded to tens, never negative, the same answer for the same count.

    The rule of the MII feasibility plugin's ``FeasibilityCachingLaplaceCountObfuscator``
    (medizininformatik-initiative/mii-process-feasibility at v1.0.0.9,
    ``mii-process-feasibility/src/main/java/de/medizininformatik_initiative/process/
    feasibility/FeasibilityCachingLaplaceCountObfuscator.java``; its defaults, sensitivity 1.0
    and epsilon 0.5, in ``variables/ConstantsFeasibility.java``; switched on per network by
    the plugin's ``obfuscate`` setting): draw ``noise`` from a Laplace distribution with
    location 0 and scale ``sensitivity / epsilon`` (inverse CDF of a uniform on [-0.5, 0.5)),
    publish ``max(0, round((count + noise) / 10) * 10)`` with Java's ``Math.round`` (half up).
    The obfuscated value is cached per true count (at most 10,000 entries, as there): asking
    the same question again returns the same answer, so repeated requests cannot average the
    noise away. (A 2024 change there that cut the uniform to [0.1, 0.9) was reverted two days
    later; the plugin's older ``FeasibilityCountObfuscator``, a uniform offset in [-5, 5] with
    results below 5 set to 0, is no longer used.)

    The cache lives in this object: one per site process, kept for the bridge's lifetime, as
    the plugin keeps its bean. ``rng`` is for tests; by default the operating system's CSPRNG.
    """

    MAX_CACHE_SIZE = 10_000

    def __init__(
        self,
        sensitivity: float = 1.0,
        epsilon: float = 0.5,
        *,
        rng: random.Random | None = None,
    ) -> None:
        if not (sensitivity > 0 and math.isfinite(sensitivity)):
            raise ValueError(
                f"obfuscation sensitivity must be a positive number, not {sensitivity}"
            )
        if not (epsilon > 0 and math.isfinite(epsilon)):
            raise ValueError(f"obfuscation epsilon must be a positive number, not {epsilon}")
        self.scale = sensitivity / epsilon
        self._rng = rng if rng is not None else secrets.SystemRandom()
        self._cache: OrderedDict[int, int] = OrderedDict()

    def obfuscate(self, count: int) -> int:
        if count in self._cache:
            self._cache.move_to_end(count)
            return self._cache[count]
        uniform = self._rng.random() - 0.5
        while uniform == -0.5:  # log(0); the plugin would publish an overflowed count here
            uniform = self._rng.random() - 0.5
        noise = -self.scale * math.copysign(1.0, uniform) * math.log(1 - 2 * abs(uniform))
        value = max(0, math.floor((count + noise) / 10 + 0.5) * 10)
        self._cache[count] = value
        if len(self._cache) > self.MAX_CACHE_SIZE:
            self._cache.popitem(last=False)
        return value


def quartile_minimum(k: int) -> int:
    """The fewest studies a cell publishes quartiles from: 2k. Five figures (mean, sd, q1,
    median, q3) of n values determine every value for n <= 5 (at n = 5 the quartiles are the
    2nd to 4th values, mean and sd then give the 1st and 5th), and constrain them tightly a
    little above; under 2k a cell shows n, mean and sd only."""
    return 2 * k


def effective_k(site_k: int, requested_k: int | None = None) -> int:
    """The k a site applies: its own, or the coordinator's when that is stricter.

    A coordinator may ask for a larger k than a site's default; it can never make a site
    publish smaller cells than the site allows.
    """
    for name, value in (("the site's k", site_k), ("the requested k", requested_k)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, not {value}")
    return site_k if requested_k is None else max(site_k, requested_k)


@dataclass(frozen=True)
class NumericAggregate:
    """One numeric measurement at one site: all figures, or none (``suppressed``).

    ``sd`` is the sample standard deviation (ddof=1; 0 for n=1, which k >= 2 never shows).
    No minimum or maximum: each would be one study's value.
    """

    measurement: str
    suppressed: bool
    n: int | None = None
    mean: float | None = None
    sd: float | None = None
    median: float | None = None
    q1: float | None = None
    q3: float | None = None
    # True when n is an obfuscated count: the pooled figures it enters are then not exact.
    obfuscated: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "measurement": self.measurement,
            "kind": "numeric",
            "suppressed": self.suppressed,
        }
        if not self.suppressed:
            out.update(n=self.n, mean=self.mean, sd=self.sd, obfuscated=self.obfuscated)
            if self.median is not None:  # shown from 2k studies on (quartile_minimum)
                out.update(median=self.median, q1=self.q1, q3=self.q3)
        return out


@dataclass(frozen=True)
class ClassCounts:
    """One classification at one site: the count of each class, ``None`` where suppressed.

    ``n`` (the number of studies classified) is published with the table; the suppression in
    :func:`class_counts` makes sure no suppressed class follows from it by subtraction.
    """

    measurement: str
    suppressed: bool
    n: int | None = None
    counts: Mapping[str, int | None] = field(default_factory=dict)
    obfuscated: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "measurement": self.measurement,
            "kind": "classes",
            "suppressed": self.suppressed,
        }
        if not self.suppressed:
            out.update(
                n=self.n,
                counts={
                    label: ({"suppressed": True} if value is None else value)
                    for label, value in self.counts.items()
                },
                obfuscated=self.obfuscated,
            )
        return out


Aggregate = NumericAggregate | ClassCounts


def numeric_aggregate(
    measurement: str,
    values: Iterable[float],
    *,
    k: int,
    obfuscator: CountObfuscator | None = None,
) -> NumericAggregate:
    """A site's figures for one numeric measurement over the studies it inferred.

    Fewer than ``k`` values (or any value that is not finite, which would make every figure
    meaningless) and the cell is suppressed whole. Quartiles are numpy's default (linear
    interpolation, type 7 of Hyndman and Fan). With an ``obfuscator`` only ``n`` changes; the
    other figures are computed from the true values. That is why ``sd`` is published rather
    than the sum of squared deviations: with both, ``n`` would follow from their ratio.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, not {k}")
    data = np.asarray(list(values), dtype=np.float64)
    if data.size < k or not np.all(np.isfinite(data)):
        return NumericAggregate(measurement=measurement, suppressed=True)
    n = int(data.size)
    q1: float | None
    median: float | None
    q3: float | None
    if n >= quartile_minimum(k):
        q1, median, q3 = (float(q) for q in np.quantile(data, [0.25, 0.5, 0.75]))
    else:  # with few studies the five figures would pin the values down (docs/consortium.md)
        q1 = median = q3 = None
    return NumericAggregate(
        measurement=measurement,
        suppressed=False,
        n=n if obfuscator is None else obfuscator.obfuscate(n),
        mean=float(np.mean(data)),
        sd=float(np.std(data, ddof=1)) if n > 1 else 0.0,
        median=median,
        q1=q1,
        q3=q3,
        obfuscated=obfuscator is not None,
    )


def class_counts(
    measurement: str,
    labels: Iterable[str],
    classes: Sequence[str],
    *,
    k: int,
    obfuscator: CountObfuscator | None = None,
) -> ClassCounts:
    """A site's class-count table for one classification, with k and complementary suppression.

    ``classes`` is the service contract's full list of classes: every one appears in the table,
    a class no study fell into as a count of 0, which is below k and suppressed like any small
    count (so an absent class cannot be told from a rare one). A label outside ``classes`` is a
    contract violation by the model and raises :class:`ValueError`.

    Suppression: every class below k; then, if any, more classes (smallest count first, ties
    in contract order) until at least two are suppressed and together hold at least k studies.
    If no such set exists, or fewer than k studies were classified at all, the table is
    suppressed whole. The coordinator then knows only that the suppressed classes sum to a
    figure of at least k studies, each of them anywhere between 0 and that sum.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, not {k}")
    if len(set(classes)) != len(classes) or not classes:
        raise ValueError("the classes of a classification must be distinct and not empty")
    true_counts = dict.fromkeys(classes, 0)
    for label in labels:
        if label not in true_counts:
            raise ValueError(
                f"the model returned class {label!r} for {measurement!r}, which its contract "
                "does not declare"
            )
        true_counts[label] += 1
    n = sum(true_counts.values())
    if n < k:
        return ClassCounts(measurement=measurement, suppressed=True)
    hidden = {label for label, count in true_counts.items() if count < k}
    if hidden:
        order = sorted(classes, key=lambda label: true_counts[label])
        for label in order:
            if len(hidden) >= 2 and sum(true_counts[h] for h in hidden) >= k:
                break
            hidden.add(label)
        if len(hidden) == len(classes):
            # Nothing left to show that the total does not already say.
            return ClassCounts(measurement=measurement, suppressed=True)

    def publish(count: int) -> int:
        return count if obfuscator is None else obfuscator.obfuscate(count)

    return ClassCounts(
        measurement=measurement,
        suppressed=False,
        n=publish(n),
        counts={
            label: None if label in hidden else publish(true_counts[label]) for label in classes
        },
        obfuscated=obfuscator is not None,
    )


@dataclass(frozen=True)
class SiteAnswer:
    """What the coordinator holds about one data site: its state and its aggregates.

    ``reason`` says why a site refused, failed or timed out (for the administrators, never
    with identifiers); ``None`` for a site that answered.
    """

    organization: str
    status: SiteStatus
    reason: str | None = None
    aggregates: tuple[Aggregate, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "organization": self.organization,
            "status": self.status.value,
            "reason": self.reason,
            "aggregates": [aggregate.to_json() for aggregate in self.aggregates],
        }


def aggregates_from_json(data: object) -> tuple[Aggregate, ...]:
    """A data site's aggregates as the coordinator reads them from the site's answer.

    The inverse of ``[a.to_json() for a in aggregates]``, and strict: the answer comes from
    another organization, so anything but the documented shape raises :class:`ValueError`
    with a sentence saying what is wrong (the caller records the site as failed with it).
    A class table with exactly one suppressed class is refused: its value would follow from
    the total, and refusing it keeps it out of everything the coordinator stores. The site's
    organization is not in the data: the caller takes it from the authenticated Task, never
    from the payload.
    """
    if not isinstance(data, list):
        raise ValueError("the aggregates must be a JSON list")
    out: list[Aggregate] = []
    seen: set[str] = set()
    for item in data:
        aggregate = _aggregate_from_json(item)
        if aggregate.measurement in seen:
            raise ValueError(f"measurement {aggregate.measurement!r} appears twice")
        seen.add(aggregate.measurement)
        out.append(aggregate)
    return tuple(out)


def _aggregate_from_json(item: object) -> Aggregate:
    if not isinstance(item, dict):
        raise ValueError("each aggregate must be a JSON object")
    measurement = item.get("measurement")
    kind = item.get("kind")
    if not isinstance(measurement, str) or not measurement:
        raise ValueError("an aggregate has no measurement name")
    if kind not in ("numeric", "classes"):
        raise ValueError(f"aggregate {measurement!r} has an unknown kind {kind!r}")
    if item.get("suppressed") is True:
        if set(item) != {"measurement", "kind", "suppressed"}:
            raise ValueError(f"suppressed aggregate {measurement!r} carries figures")
        if kind == "numeric":
            return NumericAggregate(measurement=measurement, suppressed=True)
        return ClassCounts(measurement=measurement, suppressed=True)
    if item.get("suppressed") is not False:
        raise ValueError(f"aggregate {measurement!r} does not say whether it is suppressed")
    obfuscated = item.get("obfuscated")
    if not isinstance(obfuscated, bool):
        raise ValueError(f"aggregate {measurement!r} does not say whether it is obfuscated")
    n = _count(item.get("n"), f"n of {measurement!r}")
    if kind == "numeric":
        keys = {"measurement", "kind", "suppressed", "obfuscated", "n", "mean", "sd"}
        quartile_keys = {"median", "q1", "q3"}
        if set(item) not in (keys, keys | quartile_keys):
            raise ValueError(
                f"aggregate {measurement!r} must have exactly {sorted(keys)}, with or without "
                f"{sorted(quartile_keys)}"
            )
        mean, sd = (_finite(item[name], f"{name} of {measurement!r}") for name in ("mean", "sd"))
        median = q1 = q3 = None
        if "median" in item:
            median, q1, q3 = (
                _finite(item[name], f"{name} of {measurement!r}") for name in ("median", "q1", "q3")
            )
        if sd < 0 or (median is not None and not q1 <= median <= q3):  # type: ignore[operator]
            raise ValueError(f"the figures of {measurement!r} contradict each other")
        return NumericAggregate(
            measurement=measurement,
            suppressed=False,
            n=n,
            mean=mean,
            sd=sd,
            median=median,
            q1=q1,
            q3=q3,
            obfuscated=obfuscated,
        )
    if set(item) != {"measurement", "kind", "suppressed", "obfuscated", "n", "counts"}:
        raise ValueError(f"class table {measurement!r} has unexpected or missing fields")
    raw = item["counts"]
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"class table {measurement!r} has no classes")
    counts: dict[str, int | None] = {}
    for label, value in raw.items():
        if value == {"suppressed": True}:
            counts[label] = None
        else:
            counts[label] = _count(value, f"class {label!r} of {measurement!r}")
    if sum(value is None for value in counts.values()) == 1:
        raise ValueError(
            f"class table {measurement!r} hides a single class, which follows from its total: "
            "the site's suppression is broken"
        )
    shown = sum(value for value in counts.values() if value is not None)
    # The messages name no figure: the caller stores them as the site's reason, and the
    # difference of a broken table's figures may be a count under k.
    if not obfuscated and shown > n:
        raise ValueError(
            f"class table {measurement!r} shows more studies in its classes than its total"
        )
    if not obfuscated and None not in counts.values() and shown != n:
        raise ValueError(f"the classes of table {measurement!r} do not add up to its total")
    return ClassCounts(
        measurement=measurement, suppressed=False, n=n, counts=counts, obfuscated=obfuscated
    )


def _count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be a count (an integer of at least 0)")
    return value


def _finite(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number")
    return float(value)


def pool_moments(parts: Iterable[tuple[int, float, float]]) -> tuple[int, float, float]:
    """Exact pooled (n, mean, sd) from per-group (n, mean, sd), sd with ddof=1.

    With ``M2 = sd**2 * (n - 1)`` (the sum of squared deviations from the group's mean), groups
    a and b combine as (Chan, Golub, LeVeque 1979)::

        n = na + nb;  delta = mean_b - mean_a
        mean = mean_a + delta * nb / n
        M2 = M2_a + M2_b + delta**2 * na * nb / n

    and the pooled sd is ``sqrt(M2 / (n - 1))``. This equals the figures over all values at
    once; unlike sums and sums of squares it does not lose the variance to cancellation when the
    mean is large against the spread (volumes in mm³, say).
    """
    n_total = 0
    mean_total = 0.0
    m2_total = 0.0
    for n, mean, sd in parts:
        if n <= 0:
            continue
        m2 = sd * sd * (n - 1)
        combined = n_total + n
        delta = mean - mean_total
        mean_total += delta * n / combined
        m2_total += m2 + delta * delta * n_total * n / combined
        n_total = combined
    if n_total == 0:
        raise ValueError("no group with studies to pool")
    sd_total = math.sqrt(m2_total / (n_total - 1)) if n_total > 1 else 0.0
    return n_total, mean_total, sd_total


@dataclass(frozen=True)
class PooledNumeric:
    """One numeric measurement over all sites that could show it.

    ``exact`` is false when a contributing site obfuscated its n (the moments are then
    weighted by noisy counts). The quartiles are always approximate: the n-weighted mean of
    the sites' quartiles, which is exact only when the sites' distributions agree.
    ``suppressed_at`` names the sites whose cell fell under k: they contribute nothing.
    """

    measurement: str
    n: int
    mean: float
    sd: float
    median: float | None
    q1: float | None
    q3: float | None
    exact: bool
    sites: tuple[str, ...]
    suppressed_at: tuple[str, ...]
    # The sites whose quartiles the pooled ones weigh (those that showed quartiles), and their n.
    quartile_sites: tuple[str, ...] = ()
    quartile_n: int = 0

    def to_json(self) -> dict[str, Any]:
        quartiles: dict[str, Any] | None = None
        if self.median is not None:
            quartiles = {
                "q1": self.q1,
                "median": self.median,
                "q3": self.q3,
                "approximate": True,
                "method": "n-weighted mean of the site quartiles",
                "n": self.quartile_n,
                "sites": list(self.quartile_sites),
            }
        return {
            "kind": "numeric",
            "n": self.n,
            "mean": self.mean,
            "sd": self.sd,
            "exact": self.exact,
            "quartiles": quartiles,
            "sites": list(self.sites),
            "suppressed_at": list(self.suppressed_at),
        }


@dataclass(frozen=True)
class PooledClassCounts:
    """One classification summed over the sites; a class's sum leaves out sites that hid it.

    ``counts[c]`` sums class ``c`` over the sites that showed it; ``incomplete[c]`` names the
    sites that suppressed it, so a reader knows the sum is a lower bound there. ``n`` sums the
    totals of the sites whose table was shown.
    """

    measurement: str
    n: int
    counts: Mapping[str, int]
    incomplete: Mapping[str, tuple[str, ...]]
    exact: bool
    sites: tuple[str, ...]
    suppressed_at: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "classes",
            "n": self.n,
            "counts": dict(self.counts),
            "incomplete": {label: list(sites) for label, sites in self.incomplete.items()},
            "exact": self.exact,
            "sites": list(self.sites),
            "suppressed_at": list(self.suppressed_at),
        }


@dataclass(frozen=True)
class ConsortiumResult:
    """The merged result the coordinator stores: every site (answered or not) and the pools.

    A measurement every site suppressed has no pooled entry; ``unpooled`` names it with the
    sites that hid it, so its absence is explained rather than silent.
    """

    sites: tuple[SiteAnswer, ...]
    pooled: Mapping[str, PooledNumeric | PooledClassCounts]
    unpooled: Mapping[str, tuple[str, ...]]

    def to_json(self) -> dict[str, Any]:
        return {
            "sites": [site.to_json() for site in self.sites],
            "pooled": {name: pooled.to_json() for name, pooled in self.pooled.items()},
            "unpooled": {name: list(sites) for name, sites in self.unpooled.items()},
        }


def merge(answers: Sequence[SiteAnswer]) -> ConsortiumResult:
    """Pool the sites' aggregates per measurement; sites that did not answer pool nothing.

    Partial results are results: a site that refused, failed or timed out is listed with its
    reason and simply absent from every pool. A measurement whose kind differs between sites
    (numeric at one, classes at another) is a contract mismatch and raises
    :class:`ValueError`.
    """
    organizations = [answer.organization for answer in answers]
    if len(set(organizations)) != len(organizations):
        raise ValueError("each site may answer once in a merged result")
    shown: dict[str, list[tuple[str, Aggregate]]] = {}
    hidden: dict[str, list[str]] = {}
    kinds: dict[str, type] = {}
    for answer in answers:
        if answer.status not in (SiteStatus.DONE, SiteStatus.SUPPRESSED):
            continue
        for aggregate in answer.aggregates:
            kind = type(aggregate)
            if kinds.setdefault(aggregate.measurement, kind) is not kind:
                raise ValueError(
                    f"measurement {aggregate.measurement!r} is numeric at one site and a "
                    "classification at another: the sites run different contracts"
                )
            shown.setdefault(aggregate.measurement, [])
            hidden.setdefault(aggregate.measurement, [])
            if aggregate.suppressed:
                hidden[aggregate.measurement].append(answer.organization)
            else:
                shown[aggregate.measurement].append((answer.organization, aggregate))

    pooled: dict[str, PooledNumeric | PooledClassCounts] = {}
    unpooled: dict[str, tuple[str, ...]] = {}
    for measurement, parts in shown.items():
        suppressed_at = tuple(hidden[measurement])
        if not parts:
            unpooled[measurement] = suppressed_at
            continue
        # An obfuscated n can round to 0: such a cell weighs nothing in a pool.
        numeric = [(o, a) for o, a in parts if isinstance(a, NumericAggregate) and a.n != 0]
        classes = [(o, a) for o, a in parts if isinstance(a, ClassCounts)]
        if not numeric and not classes:
            unpooled[measurement] = suppressed_at
        elif numeric:
            pooled[measurement] = _pool_numeric(measurement, numeric, suppressed_at)
        else:
            pooled[measurement] = _pool_classes(measurement, classes, suppressed_at)
    return ConsortiumResult(sites=tuple(answers), pooled=pooled, unpooled=unpooled)


def _pool_numeric(
    measurement: str,
    parts: Sequence[tuple[str, NumericAggregate]],
    suppressed_at: tuple[str, ...],
) -> PooledNumeric:
    moments = []
    quartiles = []
    quartile_sites = []
    for organization, aggregate in parts:
        n, mean, sd = aggregate.n, aggregate.mean, aggregate.sd
        if n is None or mean is None or sd is None:
            raise ValueError(
                f"site {organization} sent {measurement!r} neither suppressed nor complete"
            )
        moments.append((n, mean, sd))
        q1, median, q3 = aggregate.q1, aggregate.median, aggregate.q3
        if q1 is not None and median is not None and q3 is not None and n > 0:
            quartiles.append((n, q1, median, q3))
            quartile_sites.append(organization)
    n_all, mean_all, sd_all = pool_moments(moments)
    q1_all = median_all = q3_all = None
    if quartiles:
        weights = np.array([w for w, *_ in quartiles], dtype=np.float64)
        values = np.array([q for _, *q in quartiles], dtype=np.float64)
        q1_all, median_all, q3_all = (float(v) for v in weights @ values / weights.sum())
    return PooledNumeric(
        measurement=measurement,
        n=n_all,
        mean=mean_all,
        sd=sd_all,
        median=median_all,
        q1=q1_all,
        q3=q3_all,
        exact=not any(aggregate.obfuscated for _, aggregate in parts),
        sites=tuple(org for org, _ in parts),
        suppressed_at=suppressed_at,
        quartile_sites=tuple(quartile_sites),
        quartile_n=sum(w for w, *_ in quartiles),
    )


def _pool_classes(
    measurement: str,
    parts: Sequence[tuple[str, ClassCounts]],
    suppressed_at: tuple[str, ...],
) -> PooledClassCounts:
    counts: dict[str, int] = {}
    incomplete: dict[str, list[str]] = {}
    n = 0
    for organization, table in parts:
        if table.n is None:
            raise ValueError(f"site {organization} sent {measurement!r} without its total")
        n += table.n
        for label, value in table.counts.items():
            counts.setdefault(label, 0)
            if value is None:
                incomplete.setdefault(label, []).append(organization)
            else:
                counts[label] += value
    return PooledClassCounts(
        measurement=measurement,
        n=n,
        counts=counts,
        incomplete={label: tuple(sites) for label, sites in incomplete.items()},
        exact=not any(table.obfuscated for _, table in parts),
        sites=tuple(org for org, _ in parts),
        suppressed_at=suppressed_at,
    )
