"""The reference inference model (DESIGN 5a): HU tissue composition in ``composition`` (pure
numpy and scipy) and its MLServer runtime in ``tissue_model`` (imported only by MLServer)."""

from dsf_bridge.sandbox.refmodel.composition import (
    LABELS,
    TISSUES,
    Composition,
    body_mask,
    tissue_composition,
    tissue_labels,
)

__all__ = ["LABELS", "TISSUES", "Composition", "body_mask", "tissue_composition", "tissue_labels"]
