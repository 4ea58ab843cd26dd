"""Trains ``ct-density`` (``density.py``) in MLServer's own virtual environment, where
scikit-learn lives: ``python density_train.py <model folder>`` reads ``training.npz`` (features
``x``, labels ``y``) from the folder and writes ``model.joblib`` beside it, for MLServer's stock
scikit-learn runtime. numpy, scikit-learn and joblib only."""

from __future__ import annotations

import sys
from pathlib import Path

import joblib
import numpy as np
from sklearn.linear_model import LogisticRegression


def main(folder: Path) -> None:
    data = np.load(folder / "training.npz")
    model = LogisticRegression(C=100.0, max_iter=2000)
    model.fit(data["x"], data["y"])
    joblib.dump(model, folder / "model.joblib")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
