"""The reference model as a KServe custom model (``kserve.Model``): HU tissue composition over
OIP v2, served by KServe's Python model server, whose REST endpoint speaks the binary tensor
data extension (MLServer's does not).

Run in KServe's own virtual environment (``scripts/setup-kserve.sh``), where dsf-bridge is not
installed, as ``python kserve_model.py --http_port N [--model_name NAME]``; it loads
``composition.py`` from its own directory by path, so the server runs exactly the source our
tests import. The contract is the one of ``tissue_model.py`` (the MLServer runtime): inputs
``hu`` (slices, rows, columns) and ``spacing_mm`` (3,); per tissue ``<tissue>_area_cm2``,
``<tissue>_volume_ml`` and ``<tissue>_mean_hu`` (NaN when the tissue has no voxel); the label
map ``tissue_labels`` when a request names it. Outputs come back binary when the request asks
so (``binary_data_output`` or per-output ``binary_data``), JSON otherwise; KServe returns only
the outputs a request names, when it names any.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer
from kserve.errors import InvalidInput


def _composition() -> ModuleType:
    name = "dsf_bridge_refmodel_composition"
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("composition.py"))
    if spec is None or spec.loader is None:  # pragma: no cover - the file ships beside this one
        raise ImportError("composition.py not found beside kserve_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


class TissueCompositionModel(Model):  # type: ignore[misc]  # kserve is untyped here
    """Tissue areas, volumes and mean HU by Hounsfield-unit ranges."""

    def load(self) -> bool:
        self._composition = _composition()
        self.ready = True
        return True

    async def predict(
        self, payload: InferRequest, headers: dict[str, str] | None = None, **_: Any
    ) -> InferResponse:
        inputs = {item.name: item for item in payload.inputs}
        missing = {"hu", "spacing_mm"} - inputs.keys()
        if missing:
            raise InvalidInput(f"missing input tensors: {sorted(missing)}")
        try:
            hu = inputs["hu"].as_numpy()
            spacing = inputs["spacing_mm"].as_numpy()
        except ValueError as exc:  # data that does not fill the declared shape
            raise InvalidInput(f"input tensors do not match their shapes: {exc}") from exc
        if hu.ndim != 3:
            raise InvalidInput(
                f"input 'hu' must have shape (slices, rows, columns), got {list(hu.shape)}"
            )
        try:
            result = self._composition.tissue_composition(hu, spacing)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from exc
        outputs: list[InferOutput] = [_output(*named) for named in result.named_outputs()]
        requested = {output.name for output in payload.request_outputs or ()}
        if "tissue_labels" in requested:
            outputs.append(_output("tissue_labels", self._composition.tissue_labels(hu)))
        return InferResponse(
            # KServe's REST answer requires an id; a request without one gets a fresh one.
            response_id=payload.id or str(uuid.uuid4()),
            model_name=self.name,
            infer_outputs=outputs,
            use_binary_outputs=payload.use_binary_outputs,
            requested_outputs=payload.request_outputs,
        )


def _output(name: str, values: Any) -> InferOutput:
    array = np.asarray(values)
    datatype = "UINT8" if array.dtype == np.uint8 else "FP64"
    array = array.astype(np.uint8 if datatype == "UINT8" else np.float64)
    output = InferOutput(name=name, shape=list(array.shape), datatype=datatype)
    output.set_data_from_numpy(array, binary_data=False)
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_name", default="tissue-composition")
    known, _ = parser.parse_known_args()  # the rest are KServe's own (--http_port, ...)
    model = TissueCompositionModel(known.model_name)
    model.load()
    ModelServer().start([model])


if __name__ == "__main__":
    main()
