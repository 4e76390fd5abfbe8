"""Figures of inputs and their attributions (matplotlib; `pip install dlkit[plots]`).

    fig = plot_attributions(images, {"saliency": sal, "IG": ig}, labels=y, predictions=pred)
    fig.savefig("explain.png")   # or show it in a notebook cell

The figures are `matplotlib.figure.Figure` objects made without pyplot, so nothing depends on
the interactive backend and no global figure state is kept; in a notebook, `display(fig)`.
"""

from collections.abc import Mapping, Sequence

import numpy as np


def _matplotlib():
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            "dlkit.explain plots need matplotlib: pip install 'dlkit[plots]' (or matplotlib)"
        ) from e
    return Figure


def _as_image(a: np.ndarray, name: str) -> np.ndarray:
    """(B, H, W) or (B, H, W, C) -> (B, H, W) (channels summed; an attribution's total)."""
    if a.ndim == 4:
        return a.sum(axis=-1)
    if a.ndim == 3:
        return a
    raise ValueError(f"{name}: expected (B, H, W) or (B, H, W, C) arrays, got shape {a.shape}")


def plot_attributions(
    inputs,
    attributions,
    *,
    labels: Sequence | None = None,
    predictions: Sequence | None = None,
    class_names: Sequence[str] | None = None,
    titles: Sequence[str] | None = None,
    percentile: float = 99.0,
    cell_size: float = 1.6,
):
    """A grid: the inputs in the first row, one row of heat maps per attribution method.

    Signed attributions (any value < 0) use a diverging colormap centred at 0 (red positive,
    blue negative) with limits +-(the `percentile` of |a|) per image; non-negative ones (e.g.
    saliency, occlusion drops, attention) a sequential colormap from 0.

    Args:
      inputs: (B, H, W) or (B, H, W, C) images; 1 channel is drawn grey, 3 as RGB.
      attributions: one (B, H, W[, C]) array, or {row title: array}; channels are summed.
      labels: optional (B,) true classes, shown in the column titles.
      predictions: optional (B,) predicted classes, shown in the column titles.
      class_names: optional names for the class indices.
      titles: optional per-column titles (replace the label/prediction titles).
      percentile: of |attribution| per image, used as the colour limit (clips outliers).
      cell_size: inches per image.
    Returns:
      A `matplotlib.figure.Figure` with (1 + rows) * B axes.
    """
    figure_cls = _matplotlib()
    images = np.asarray(inputs, dtype=np.float32)
    if images.ndim not in (3, 4):
        raise ValueError(f"inputs: expected (B, H, W) or (B, H, W, C), got shape {images.shape}")
    if not isinstance(attributions, Mapping):
        attributions = {"attribution": attributions}
    rows = {name: _as_image(np.asarray(a, np.float32), name) for name, a in attributions.items()}
    b = images.shape[0]
    for name, a in rows.items():
        if a.shape != (b, *images.shape[1:3]):
            raise ValueError(
                f"attributions[{name!r}]: expected ({b}, {images.shape[1]}, {images.shape[2]}"
                f"[, C]), got {np.shape(attributions[name])}"
            )
    if titles is not None and len(titles) != b:
        raise ValueError(f"titles: expected {b} titles, got {len(titles)}")

    def name_of(c):
        return class_names[int(c)] if class_names is not None else str(int(c))

    fig = figure_cls(figsize=(cell_size * b + 1.2, cell_size * (1 + len(rows))), layout="tight")
    axes = fig.subplots(1 + len(rows), b, squeeze=False)
    for j in range(b):
        img = images[j]
        if img.ndim == 3 and img.shape[-1] == 1:
            img = img[..., 0]
        axes[0, j].imshow(img, cmap="gray" if img.ndim == 2 else None)
        if titles is not None:
            axes[0, j].set_title(str(titles[j]), fontsize=8)
        elif labels is not None or predictions is not None:
            parts = []
            if labels is not None:
                parts.append(f"y={name_of(labels[j])}")
            if predictions is not None:
                parts.append(f"pred={name_of(predictions[j])}")
            axes[0, j].set_title(" ".join(parts), fontsize=8)
    for i, (name, a) in enumerate(rows.items(), start=1):
        signed = bool(np.any(a < 0))
        for j in range(b):
            limit = float(np.percentile(np.abs(a[j]), percentile)) or 1e-12
            if signed:
                axes[i, j].imshow(a[j], cmap="RdBu_r", vmin=-limit, vmax=limit)
            else:
                axes[i, j].imshow(a[j], cmap="inferno", vmin=0.0, vmax=limit)
        axes[i, 0].set_ylabel(name, fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_ylabel("input", fontsize=9)
    return fig
