"""A second reference model with a contract unlike the first: ``my-model``, a two-dimensional
classifier that answers with a probability (``nodule_probability``) and class probabilities
(``nodule_class``: absent, present). It stands for a provider's own model in the tests, the
worked example of ``docs/omi.md``; it is real arithmetic on real pixels, not medicine.

Input: one slice, lung-windowed and scaled to 0..1 by the bridge as the contract declares
(``docs/examples/my-model.toml``). The score is the share of the slice's pixels in the dense
band 0.5..0.9 of that scale (soft tissue and denser, short of bone), passed through a logistic
curve centred at 25 %.

Like ``composition.py`` this file depends on numpy only: MLServer's runtime beside it
(``nodule_model.py``) loads it by path in MLServer's own virtual environment.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

__all__ = ["nodule_probability"]

_DENSE_LOW, _DENSE_HIGH = 0.5, 0.9
_CENTRE, _STEEPNESS = 0.25, 12.0


def nodule_probability(image: npt.ArrayLike) -> float:
    """The score of one slice (rows, columns) with values in 0..1."""
    pixels = np.asarray(image, dtype=np.float64)
    if pixels.ndim != 2 or 0 in pixels.shape:
        raise ValueError(f"expected one slice of shape (rows, columns), got {pixels.shape}")
    if not np.all(np.isfinite(pixels)) or pixels.min() < 0.0 or pixels.max() > 1.0:
        raise ValueError("expected values in 0..1 (the lung window, scaled)")
    dense = float(np.mean((pixels >= _DENSE_LOW) & (pixels <= _DENSE_HIGH)))
    return 1.0 / (1.0 + math.exp(-_STEEPNESS * (dense - _CENTRE)))
