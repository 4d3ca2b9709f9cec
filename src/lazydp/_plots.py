"""matplotlib for the PNG reports, on its Agg backend (files only: no display needed)."""

from __future__ import annotations

from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` with the Agg backend selected (imported on first use: the CLI's
    ``--help`` and the training path never pay for matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
