"""The reference model as an MLServer custom runtime: HU tissue composition over OIP v2.

MLServer imports this module in its own virtual environment (``scripts/setup-mlserver.sh``),
where dsf-bridge is not installed; it therefore loads ``composition.py`` from its own directory
by path, so the server runs exactly the source our tests import.

Contract (the one a deep body-composition model would fill as well):

- inputs: ``hu`` FP32 (slices, rows, columns), Hounsfield units; ``spacing_mm`` FP32 (3,),
  slice spacing (thickness for a single slice), row and column spacing in mm.
- outputs, for each tissue of ``body, bone, muscle, adipose, air``: ``<tissue>_area_cm2`` FP64
  (slices,), ``<tissue>_volume_ml`` FP64 (1,), ``<tissue>_mean_hu`` FP64 (1,) (null when the
  tissue has no voxel).
- on request only (``outputs`` naming it): ``tissue_labels`` UINT8 (slices, rows, columns), the
  label map of ``composition.LABELS``, for a DICOM SEG.

Two model-settings parameters stand in for failures in tests: ``extra.ready = false`` makes
``load`` report not ready (a model still warming up), ``extra.fail = true`` makes every
prediction raise (a model crashing: MLServer answers HTTP 500).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.errors import MLServerError
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput


def load_sibling(filename: str, name: str) -> ModuleType:
    """The module in ``filename`` beside this one, imported by path as ``name`` (once)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(filename))
    if spec is None or spec.loader is None:  # pragma: no cover - the file ships beside this one
        raise ImportError(f"{filename} not found beside tissue_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


class InvalidInputError(MLServerError):  # type: ignore[misc]  # mlserver is untyped here
    """The request's tensors do not fit the contract: HTTP 400, not a server fault."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status_code=400)


class TissueCompositionModel(MLModel):  # type: ignore[misc]  # mlserver is untyped here
    """Tissue areas, volumes and mean HU by Hounsfield-unit ranges."""

    async def load(self) -> bool:
        self._composition = load_sibling("composition.py", "dsf_bridge_refmodel_composition")
        extra: dict[str, Any] = {}
        if self.settings.parameters is not None and self.settings.parameters.extra:
            extra = dict(self.settings.parameters.extra)
        self._fail = bool(extra.get("fail", False))
        return bool(extra.get("ready", True))

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        inputs = {item.name: item for item in payload.inputs}
        missing = {"hu", "spacing_mm"} - inputs.keys()
        if missing:
            raise InvalidInputError(f"missing input tensors: {sorted(missing)}")
        try:
            hu = NumpyCodec.decode_input(inputs["hu"])
            spacing = NumpyCodec.decode_input(inputs["spacing_mm"])
        except ValueError as exc:  # data that does not fill the declared shape
            raise InvalidInputError(f"input tensors do not match their shapes: {exc}") from exc
        if hu.ndim != 3:
            raise InvalidInputError(
                f"input 'hu' must have shape (slices, rows, columns), got {list(hu.shape)}"
            )
        if self._fail:
            raise RuntimeError("reference model configured to fail")
        try:
            result = self._composition.tissue_composition(hu, spacing)
        except ValueError as exc:
            raise InvalidInputError(str(exc)) from exc
        outputs: list[ResponseOutput] = [_fp64(*named) for named in result.named_outputs()]
        requested = {output.name for output in payload.outputs or ()}
        if "tissue_labels" in requested:
            labels = self._composition.tissue_labels(hu)
            outputs.append(
                ResponseOutput(
                    name="tissue_labels",
                    shape=list(labels.shape),
                    datatype="UINT8",
                    data=labels.ravel().tolist(),
                )
            )
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            id=payload.id,
            outputs=outputs,
        )


def _fp64(name: str, values: Any) -> ResponseOutput:
    # Built by hand: NumpyCodec would add a batch axis ((n,) -> (n, 1)); NaN travels as null.
    array = np.asarray(values, dtype=np.float64)
    data = [None if np.isnan(value) else float(value) for value in array.ravel()]
    return ResponseOutput(name=name, shape=list(array.shape), datatype="FP64", data=data)
