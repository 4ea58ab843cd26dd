"""``ct-density``: the second real model of the demo and the tests, with a contract of its
own (the shipped ``dsf_bridge/omi/contracts/ct-density.toml``), served by MLServer's stock
scikit-learn runtime. It says whether a CT slice is denser or less dense than
``CT_small.dcm``: a logistic regression over the histogram of the slice's Hounsfield units,
trained when MLServer starts on copies of ``CT_small.dcm`` shifted by -300..300 HU. Real
DICOM, real features (computed by the bridge's own conversion, as the contract declares),
real training; not medicine.

:func:`train` runs in our environment: it makes the training set with
:func:`~dsf_bridge.omi.conversion.model_inputs` and leaves the fit to ``density_train.py`` in
MLServer's environment, so that the model file matches the scikit-learn that serves it.
"""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file

from dsf_bridge.omi.contract import InferenceContract
from dsf_bridge.omi.conversion import model_inputs, volume_from_datasets

__all__ = ["SHIFTS_HU", "shifted", "train", "training_set"]

#: The shifts of CT_small's HU the model learns from; positive shifts are "dense" (class 1).
SHIFTS_HU: tuple[int, ...] = tuple(shift for shift in range(-300, 301, 25) if abs(shift) >= 50)
_TRAINER = Path(__file__).with_name("density_train.py")


def shifted(shift_hu: float) -> pydicom.Dataset:
    """``CT_small.dcm`` with every Hounsfield unit moved by ``shift_hu`` (by its intercept)."""
    path = get_testdata_file("CT_small.dcm")
    if path is None:  # pragma: no cover - ships in every pydicom wheel
        raise FileNotFoundError("CT_small.dcm is missing from the pydicom installation")
    ds = copy.deepcopy(pydicom.dcmread(path))
    ds.RescaleIntercept = float(ds.get("RescaleIntercept", 0.0)) + shift_hu
    return ds


def training_set(contract: InferenceContract) -> tuple[np.ndarray, np.ndarray]:
    """Features (one row per shift, as the contract makes them) and labels (1: dense)."""
    rows = [
        model_inputs(volume_from_datasets([shifted(shift)], contract), contract)[0].data
        for shift in SHIFTS_HU
    ]
    return np.vstack(rows).astype(np.float64), np.array([int(s > 0) for s in SHIFTS_HU])


def train(folder: Path, python: Path, contract: InferenceContract) -> None:
    """Write ``model.joblib`` into ``folder``, fitted by ``python`` (MLServer's)."""
    x, y = training_set(contract)
    np.savez(folder / "training.npz", x=x, y=y)
    subprocess.run(  # noqa: S603 - MLServer's interpreter and our script, no shell
        [str(python), str(_TRAINER), str(folder)], check=True, timeout=120
    )
