"""The statistics of a consortium request: k rule, complementary suppression, obfuscation and
exact pooling, checked against numpy over all values and by brute force over what a coordinator
could infer."""

from __future__ import annotations

import itertools
import json
import math
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsf_bridge.omi.aggregates import (
    DEFAULT_K,
    ClassCounts,
    LaplaceCountObfuscator,
    NumericAggregate,
    PooledClassCounts,
    PooledNumeric,
    SiteAnswer,
    SiteStatus,
    aggregates_from_json,
    class_counts,
    effective_k,
    merge,
    numeric_aggregate,
    pool_moments,
)

CLASSES = ("fatty", "scattered", "heterogeneous", "dense")


def _seeded(seed: int) -> random.Random:
    return random.Random(seed)  # noqa: S311 - reproducible noise for a test, not a secret


def test_numeric_aggregate_matches_numpy() -> None:
    rng = np.random.default_rng(7)
    values = rng.normal(1200.0, 80.0, size=23)
    cell = numeric_aggregate("volume", values.tolist(), k=5)
    assert not cell.suppressed
    assert cell.n == 23
    assert cell.mean == pytest.approx(float(values.mean()), abs=1e-12)
    assert cell.sd == pytest.approx(float(values.std(ddof=1)), abs=1e-12)
    q1, median, q3 = np.quantile(values, [0.25, 0.5, 0.75])
    assert (cell.q1, cell.median, cell.q3) == pytest.approx((q1, median, q3))
    assert cell.q1 is not None and cell.q3 is not None and cell.q1 < cell.q3


@pytest.mark.parametrize("n", [0, 1, 4])
def test_numeric_cell_below_k_carries_no_figure(n: int) -> None:
    cell = numeric_aggregate("volume", [10.0 + i for i in range(n)], k=5)
    assert cell.suppressed
    assert cell.to_json() == {"measurement": "volume", "kind": "numeric", "suppressed": True}


def test_numeric_cell_at_k_is_shown() -> None:
    assert not numeric_aggregate("volume", [1.0, 2.0, 3.0, 4.0, 5.0], k=5).suppressed


def test_a_non_finite_value_suppresses_the_cell() -> None:
    assert numeric_aggregate("volume", [1.0, 2.0, math.nan, 4.0, 5.0, 6.0], k=5).suppressed


def test_effective_k_is_never_below_the_site_or_the_request() -> None:
    assert effective_k(DEFAULT_K) == 5
    assert effective_k(5, 3) == 5
    assert effective_k(5, 11) == 11
    assert effective_k(20, 11) == 20
    with pytest.raises(ValueError, match="at least 1"):
        effective_k(5, 0)


def test_class_counts_show_classes_at_or_above_k() -> None:
    labels = ["fatty"] * 7 + ["scattered"] * 9 + ["heterogeneous"] * 5 + ["dense"] * 6
    table = class_counts("density", labels, CLASSES, k=5)
    assert not table.suppressed
    assert table.n == 27
    assert dict(table.counts) == {"fatty": 7, "scattered": 9, "heterogeneous": 5, "dense": 6}


def test_one_small_class_drags_the_next_smallest_with_it() -> None:
    labels = ["fatty"] * 2 + ["scattered"] * 9 + ["heterogeneous"] * 6 + ["dense"] * 8
    table = class_counts("density", labels, CLASSES, k=5)
    assert table.n == 25
    # fatty alone would follow from n - 9 - 6 - 8; heterogeneous (the next smallest) hides it.
    assert dict(table.counts) == {"fatty": None, "scattered": 9, "heterogeneous": None, "dense": 8}
    shown = table.to_json()
    assert shown["counts"]["fatty"] == {"suppressed": True}


def test_an_absent_class_is_suppressed_like_a_rare_one() -> None:
    labels = ["scattered"] * 9 + ["heterogeneous"] * 6 + ["dense"] * 8
    table = class_counts("density", labels, CLASSES, k=5)
    assert table.counts["fatty"] is None


def test_a_table_with_nothing_safe_to_show_is_suppressed_whole() -> None:
    # Two classes, one small: hiding both leaves only the total, which says it all.
    table = class_counts("side", ["left"] * 9 + ["right"] * 2, ("left", "right"), k=5)
    assert table.suppressed
    assert class_counts("density", ["dense"] * 4, CLASSES, k=5).suppressed


def test_an_undeclared_class_is_a_contract_violation() -> None:
    with pytest.raises(ValueError, match="does not declare"):
        class_counts("density", ["dense"] * 5 + ["unknown"], CLASSES, k=5)


def _consistent_values(table: ClassCounts, classes: tuple[str, ...]) -> dict[str, set[int]]:
    """Every value each suppressed class can take given what the coordinator received."""
    assert table.n is not None
    hidden = [c for c in classes if table.counts[c] is None]
    rest = table.n - sum(v for v in table.counts.values() if v is not None)
    possible: dict[str, set[int]] = {c: set() for c in hidden}
    for combination in itertools.product(range(rest + 1), repeat=len(hidden)):
        if sum(combination) == rest:
            for label, value in zip(hidden, combination, strict=True):
                possible[label].add(value)
    return possible


@settings(max_examples=300, deadline=None)
@given(
    counts=st.lists(st.integers(min_value=0, max_value=12), min_size=2, max_size=5),
    k=st.integers(min_value=2, max_value=8),
)
def test_no_suppressed_class_follows_from_what_the_coordinator_received(
    counts: list[int], k: int
) -> None:
    classes = tuple(f"c{i}" for i in range(len(counts)))
    labels = [label for label, count in zip(classes, counts, strict=True) for _ in range(count)]
    table = class_counts("m", labels, classes, k=k)
    if table.suppressed:
        assert table.to_json() == {"measurement": "m", "kind": "classes", "suppressed": True}
        return
    truth = dict(zip(classes, counts, strict=True))
    for label, value in table.counts.items():
        if value is not None:
            assert value == truth[label] >= k
    possible = _consistent_values(table, classes)
    for label, values in possible.items():
        assert truth[label] in values
        # Not pinned down, and not narrowed to "fewer than k" either.
        assert len(values) > 1
        assert max(values) >= k


def test_laplace_obfuscation_rounds_to_tens_and_repeats_itself() -> None:
    obfuscator = LaplaceCountObfuscator(rng=_seeded(3))
    results = [obfuscator.obfuscate(count) for count in range(0, 500)]
    assert all(value % 10 == 0 and value >= 0 for value in results)
    # Scale 2 noise and rounding to tens: never further than 5 + a generous tail.
    assert all(abs(value - count) <= 40 for count, value in enumerate(results))
    assert any(value != count for count, value in enumerate(results))
    # The same question gets the same answer: the noise cannot be averaged away.
    assert [obfuscator.obfuscate(count) for count in range(0, 500)] == results


class _NoNoise(random.Random):
    """A uniform draw of exactly 0.5: Laplace noise 0, so only the rounding shows."""

    def random(self) -> float:
        return 0.5


@pytest.mark.parametrize(
    ("count", "published"), [(0, 0), (4, 0), (5, 10), (15, 20), (25, 30), (34, 30), (35, 40)]
)
def test_obfuscation_rounds_half_up_as_java_does(count: int, published: int) -> None:
    # Python's round() would give 20 for 25 (half to even); the plugin's Math.round gives 30.
    assert LaplaceCountObfuscator(rng=_NoNoise()).obfuscate(count) == published


def test_laplace_noise_has_the_plugins_scale() -> None:
    obfuscator = LaplaceCountObfuscator(sensitivity=1.0, epsilon=0.05, rng=_seeded(11))
    # Scale 20: the mean absolute deviation of a Laplace distribution is its scale.
    deviations = [abs(obfuscator.obfuscate(count) - count) for count in range(1000, 6000)]
    assert 17 < float(np.mean(deviations)) < 23


def test_obfuscation_changes_counts_only() -> None:
    values = [float(v) for v in range(1, 31)]
    cell = numeric_aggregate(
        "volume", values, k=5, obfuscator=LaplaceCountObfuscator(rng=_seeded(5))
    )
    assert cell.obfuscated
    assert cell.n is not None and cell.n % 10 == 0
    assert cell.mean == pytest.approx(15.5)
    assert cell.sd == pytest.approx(float(np.std(values, ddof=1)))


def _site(organization: str, values: list[float], *, k: int = 5) -> SiteAnswer:
    return SiteAnswer(
        organization=organization,
        status=SiteStatus.DONE,
        aggregates=(numeric_aggregate("volume", values, k=k),),
    )


@settings(max_examples=200, deadline=None)
@given(
    data=st.lists(
        st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_subnormal=False),
        min_size=2,
        max_size=200,
    ),
    cuts=st.lists(st.integers(min_value=1, max_value=199), max_size=6),
    offset=st.sampled_from([0.0, 1e3, 1e6]),
)
def test_pooled_mean_and_sd_equal_those_over_all_studies(
    data: list[float], cuts: list[int], offset: float
) -> None:
    values = [v + offset for v in data]
    bounds = sorted({c for c in cuts if c < len(values)} | {0, len(values)})
    parts = [values[a:b] for a, b in itertools.pairwise(bounds)]
    answers = [_site(f"site-{i}.test", part, k=1) for i, part in enumerate(parts)]
    pooled = merge(answers).pooled["volume"]
    assert isinstance(pooled, PooledNumeric)
    everything = np.asarray(values)
    assert pooled.n == len(values)
    assert pooled.exact
    scale = max(1.0, float(np.abs(everything).max()))
    assert abs(pooled.mean - float(everything.mean())) <= 1e-9 * scale
    assert abs(pooled.sd - float(everything.std(ddof=1))) <= 1e-9 * scale


def test_pool_moments_is_not_a_mean_of_means() -> None:
    n, mean, sd = pool_moments([(10, 0.0, 1.0), (30, 4.0, 1.0)])
    assert n == 40
    assert mean == pytest.approx(3.0)  # a mean of means would say 2.0
    both = np.concatenate([np.full(10, 0.0), np.full(30, 4.0)])
    assert pool_moments([(10, 0.0, 0.0), (30, 4.0, 0.0)])[2] == pytest.approx(both.std(ddof=1))
    assert sd > 1.0


def test_merge_lists_every_site_and_pools_only_shown_cells() -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(100.0, 10.0, 40).tolist()
    b = rng.normal(110.0, 12.0, 25).tolist()
    small = rng.normal(500.0, 1.0, 3).tolist()
    answers = [
        _site("a.test", a),
        _site("b.test", b),
        SiteAnswer(
            organization="small.test",
            status=SiteStatus.SUPPRESSED,
            aggregates=(numeric_aggregate("volume", small, k=5),),
        ),
        SiteAnswer(
            organization="slow.test",
            status=SiteStatus.TIMED_OUT,
            reason="no answer within PT2H",
        ),
    ]
    result = merge(answers)
    pooled = result.pooled["volume"]
    assert isinstance(pooled, PooledNumeric)
    assert pooled.n == 65
    assert pooled.mean == pytest.approx(float(np.mean(a + b)), abs=1e-9)
    assert pooled.sd == pytest.approx(float(np.std(a + b, ddof=1)), abs=1e-9)
    assert pooled.sites == ("a.test", "b.test")
    assert pooled.suppressed_at == ("small.test",)

    shown = json.loads(json.dumps(result.to_json()))
    assert [s["organization"] for s in shown["sites"]] == [
        "a.test",
        "b.test",
        "small.test",
        "slow.test",
    ]
    assert shown["sites"][3] == {
        "organization": "slow.test",
        "status": "timed-out",
        "reason": "no answer within PT2H",
        "aggregates": [],
    }
    assert shown["sites"][2]["aggregates"] == [
        {"measurement": "volume", "kind": "numeric", "suppressed": True}
    ]
    volume = shown["pooled"]["volume"]
    assert volume["n"] == 65
    assert volume["quartiles"]["approximate"] is True
    # The small site's values appear nowhere in what the coordinator stores.
    text = json.dumps(shown)
    assert all(f"{v}" not in text for v in small)


def test_pooled_quartiles_are_the_n_weighted_site_quartiles() -> None:
    a = [float(v) for v in range(10)]
    b = [float(v) for v in range(100, 130)]
    pooled = merge([_site("a.test", a), _site("b.test", b)]).pooled["volume"]
    assert isinstance(pooled, PooledNumeric)
    expected = (10 * float(np.median(a)) + 30 * float(np.median(b))) / 40
    assert pooled.median == pytest.approx(expected)


def test_a_measurement_every_site_hid_is_named_not_dropped() -> None:
    result = merge([_site("a.test", [1.0, 2.0]), _site("b.test", [3.0])])
    assert "volume" not in result.pooled
    assert result.unpooled == {"volume": ("a.test", "b.test")}


def test_pooled_class_counts_say_where_a_class_was_hidden() -> None:
    first = ["fatty"] * 2 + ["scattered"] * 9 + ["heterogeneous"] * 6 + ["dense"] * 8
    second = ["fatty"] * 6 + ["scattered"] * 7 + ["heterogeneous"] * 5 + ["dense"] * 5
    answers = [
        SiteAnswer("a.test", SiteStatus.DONE, None, (class_counts("d", first, CLASSES, k=5),)),
        SiteAnswer("b.test", SiteStatus.DONE, None, (class_counts("d", second, CLASSES, k=5),)),
    ]
    pooled = merge(answers).pooled["d"]
    assert isinstance(pooled, PooledClassCounts)
    assert pooled.n == 48
    assert dict(pooled.counts) == {"fatty": 6, "scattered": 16, "heterogeneous": 5, "dense": 13}
    assert dict(pooled.incomplete) == {"fatty": ("a.test",), "heterogeneous": ("a.test",)}


def test_sites_running_different_contracts_cannot_be_merged() -> None:
    numeric = SiteAnswer("a.test", SiteStatus.DONE, None, (numeric_aggregate("d", [1.0] * 5, k=5),))
    classes = SiteAnswer(
        "b.test", SiteStatus.DONE, None, (class_counts("d", ["dense"] * 5, ("dense",), k=5),)
    )
    with pytest.raises(ValueError, match="different contracts"):
        merge([numeric, classes])


def test_an_incomplete_cell_from_a_site_is_refused() -> None:
    broken = SiteAnswer(
        "a.test",
        SiteStatus.DONE,
        None,
        (NumericAggregate(measurement="volume", suppressed=False, n=7, mean=1.0),),
    )
    with pytest.raises(ValueError, match="neither suppressed nor complete"):
        merge([broken])


@settings(max_examples=100, deadline=None)
@given(
    values=st.lists(st.floats(min_value=-1e3, max_value=1e3, allow_nan=False), max_size=30),
    class_sizes=st.lists(st.integers(min_value=0, max_value=12), min_size=2, max_size=5),
    k=st.integers(min_value=1, max_value=8),
)
def test_what_a_site_sends_the_coordinator_reads_back_unchanged(
    values: list[float], class_sizes: list[int], k: int
) -> None:
    classes = tuple(f"c{i}" for i in range(len(class_sizes)))
    labels = [c for c, size in zip(classes, class_sizes, strict=True) for _ in range(size)]
    sent = (
        numeric_aggregate("volume", values, k=k),
        class_counts("density", labels, classes, k=k),
    )
    wire = json.loads(json.dumps([aggregate.to_json() for aggregate in sent]))
    assert aggregates_from_json(wire) == sent


SHOWN = {
    "measurement": "volume",
    "kind": "numeric",
    "suppressed": False,
    "n": 7,
    "mean": 1.0,
    "sd": 0.5,
    "median": 1.0,
    "q1": 0.5,
    "q3": 1.5,
    "obfuscated": False,
}


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ({"measurements": []}, "must be a JSON list"),
        ([{**SHOWN, "sd": -1.0}], "contradict"),
        ([{**SHOWN, "q1": 2.0}], "contradict"),
        ([{**SHOWN, "n": -3}], "must be a count"),
        ([{**SHOWN, "n": True}], "must be a count"),
        ([{**SHOWN, "mean": "NaN"}], "finite number"),
        ([{**SHOWN, "study": "1.2.3"}], "must have exactly"),
        ([SHOWN, SHOWN], "appears twice"),
        (
            [{"measurement": "volume", "kind": "numeric", "suppressed": True, "n": 3}],
            "carries figures",
        ),
        ([{**SHOWN, "kind": "table"}], "unknown kind"),
        (
            [
                {
                    "measurement": "density",
                    "kind": "classes",
                    "suppressed": False,
                    "n": 20,
                    "counts": {"a": 9, "b": 8, "c": {"suppressed": True}},
                    "obfuscated": False,
                }
            ],
            "hides a single class",
        ),
    ],
)
def test_a_malformed_answer_is_refused_with_a_reason(answer: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        aggregates_from_json(answer)
