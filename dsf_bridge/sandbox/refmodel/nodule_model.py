"""``my-model`` (``nodule.py``) as an MLServer custom runtime, loaded in MLServer's own virtual
environment like ``tissue_model.py``.

Contract (``docs/examples/my-model.toml``): input ``image`` FP32 (rows, columns), values 0..1;
outputs ``nodule_probability`` FP32 (1,) and ``nodule_class`` FP32 (2,), the probabilities of
"absent" and "present".
"""

from __future__ import annotations

import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput

# MLServer runs with refmodel/ on its PYTHONPATH (components.MLServerProcess), where the
# reference runtime beside this file is the top-level module tissue_model.
from tissue_model import InvalidInputError, load_sibling  # type: ignore[import-not-found]


class NoduleModel(MLModel):  # type: ignore[misc]  # mlserver is untyped here
    """A probability and two class probabilities for one slice."""

    async def load(self) -> bool:
        self._nodule = load_sibling("nodule.py", "dsf_bridge_refmodel_nodule")
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        inputs = {item.name: item for item in payload.inputs}
        if "image" not in inputs:
            raise InvalidInputError(f"missing input tensor 'image', got {sorted(inputs)}")
        try:
            image = NumpyCodec.decode_input(inputs["image"])
            probability = self._nodule.nodule_probability(image)
        except ValueError as exc:
            raise InvalidInputError(str(exc)) from exc
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            id=payload.id,
            outputs=[
                _fp32("nodule_probability", [probability]),
                _fp32("nodule_class", [1.0 - probability, probability]),
            ],
        )


def _fp32(name: str, values: list[float]) -> ResponseOutput:
    array = np.asarray(values, dtype=np.float32)
    return ResponseOutput(
        name=name, shape=list(array.shape), datatype="FP32", data=array.ravel().tolist()
    )
