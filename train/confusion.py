"""The confusion among the most confused signs: which signs, the counts between them, and their picture."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import AslError
from pipeline.files import atomic_file

MOST_CONFUSED = 15  # signs in the matrix: as many as stay legible on one screen


class PlotError(AslError, RuntimeError):
    """A plot that cannot be drawn (matplotlib missing)."""


def confusion_of(true: Sequence[str], predicted: Sequence[str], n: int = MOST_CONFUSED) -> dict[str, Any]:
    """The confusion among the `n` signs in the most errors (counted as the truth and as the prediction).

    `signs`: those signs, most errors first (ties by name); `counts[i][j]`: samples of `signs[i]`
    predicted as `signs[j]`; `samples[i]`: all samples of `signs[i]` (the row's predictions may lie
    outside the matrix).
    """
    true, predicted = np.asarray(true, dtype=str), np.asarray(predicted, dtype=str)
    wrong = true != predicted
    involved = Counter(true[wrong].tolist()) + Counter(predicted[wrong].tolist())
    signs = sorted(involved, key=lambda s: (-involved[s], s))[:n]
    index = {s: i for i, s in enumerate(signs)}
    counts = np.zeros((len(signs), len(signs)), dtype=np.int64)
    for t, p in zip(true.tolist(), predicted.tolist(), strict=True):
        if t in index and p in index:
            counts[index[t], index[p]] += 1
    samples = [int((true == s).sum()) for s in signs]
    return {"signs": signs, "counts": counts.tolist(), "samples": samples}


def plot_confusion(confusion: dict[str, Any], path: str | Path, title: str) -> Path:
    """Draw a `confusion_of` result into a PNG at `path` (written under a temporary name, then renamed).

    Off the diagonal, a cell's colour is the share of the true sign's samples predicted as that sign
    and its text the count; the diagonal (correct) counts are grey text, so the errors stand out.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("--plot needs matplotlib: pip install -e '.[plot]'") from None
    signs = confusion["signs"]
    n = len(signs)
    counts = np.array(confusion["counts"], dtype=np.float64).reshape(n, n)
    share = counts / np.maximum(1, np.array(confusion["samples"], dtype=np.float64))[:, None]
    errors = np.ma.masked_array(share, mask=np.eye(n, dtype=bool))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * n + 3), max(4.0, 0.5 * n + 2.5)))
    image = ax.imshow(errors, cmap="Reds", vmin=0, vmax=max(0.05, float(errors.max()) if n else 0.05))
    for i in range(n):
        for j in range(n):
            if counts[i, j]:
                dark = i != j and errors[i, j] > 0.6 * image.norm.vmax
                ax.text(
                    j,
                    i,
                    f"{int(counts[i, j])}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="grey" if i == j else "white" if dark else "black",
                )
    ax.set_xticks(range(n), signs, rotation=45, ha="right")
    ax.set_yticks(range(n), signs)
    ax.set_xlabel("predicted sign")
    ax.set_ylabel("true sign")
    ax.set_title(title if n else f"{title}: no errors")
    fig.colorbar(image, ax=ax, label="share of the true sign's samples (errors only)")
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_file(path) as f:
            fig.savefig(f, format="png", dpi=120)
    finally:
        plt.close(fig)
    return path
