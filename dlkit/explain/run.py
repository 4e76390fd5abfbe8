"""Explain a saved run: `dlkit explain WORKDIR` (attribution grid of eval examples as a PNG).

result = explain_run("runs/fashion_mnist_cnn", methods=("saliency", "ig"), num=8,
                     out="explain.png")
result["completeness_max_relative_gap"]     # present when "ig" is among the methods
"""

import pathlib
from typing import Any

import jax
import numpy as np

from dlkit import evaluation, parallel
from dlkit.explain import attribution

METHODS = ("saliency", "gradient_x_input", "smoothgrad", "ig", "occlusion")


def explain_run(
    workdir: str | pathlib.Path,
    *,
    methods: tuple[str, ...] = ("saliency", "ig"),
    num: int = 8,
    out: str | pathlib.Path | None = None,
    step: int | None = None,
    seed: int = 0,
    eval_source=None,
    model=None,
) -> dict[str, Any]:
    """Attributions of the first `num` examples of a run's eval split, from its checkpoint.

    Args:
      workdir: the run's directory (holding checkpoints/).
      methods: any of "saliency", "gradient_x_input", "smoothgrad", "ig", "occlusion".
      num: examples, taken from the start of the eval split.
      out: where to write the PNG grid (needs matplotlib); None = no figure.
      step: checkpoint step; None = the newest.
      seed: SmoothGrad's noise seed.
      eval_source, model: as for `dlkit.evaluate`: required when the run was given Python
        objects (data) or its own model, which cannot be rebuilt from the workdir.
    Returns:
      {"step", "split", "methods", "num", "out", "labels", "predictions"} and, with "ig",
      "completeness_max_relative_gap" (the largest |sum(attr) - (f(x) - f(b))| / |f(x) - f(b)|).
    """
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"methods: expected some of {METHODS}, got {tuple(methods)}")
    if not isinstance(num, int) or num < 1:
        raise ValueError(f"num: expected an int >= 1, got {num!r}")
    workdir = pathlib.Path(workdir)
    state, cfg = evaluation.load_checkpoint(workdir, step, model=model)
    strategy = parallel.make_strategy("jit", num_devices=1)
    # The run's recorded eval data (or `eval_source`, required for data given as Python objects).
    c = evaluation.build_for(workdir, cfg, strategy, eval_source=eval_source, model=model)
    batch = c.eval_source.get_batch(np.arange(min(num, len(c.eval_source))))
    x = np.asarray(batch["inputs"], np.float32)
    ex = attribution.Explainer.from_state(state)
    predictions = np.asarray(ex.predict(x))
    result: dict[str, Any] = {
        "step": int(state.step),
        "split": cfg.data.eval_split,
        "methods": list(methods),
        "num": len(x),
        "labels": np.asarray(batch["labels"]).tolist(),
        "predictions": predictions.tolist(),
    }
    rows = {}
    for m in methods:
        if m == "saliency":
            rows["saliency"] = ex.saliency(x)
        elif m == "gradient_x_input":
            rows["gradient x input"] = ex.gradient_x_input(x)
        elif m == "smoothgrad":
            rows["SmoothGrad"] = ex.smoothgrad(x, key=jax.random.key(seed))
        elif m == "ig":
            rows["IG"], comp = ex.integrated_gradients(x, return_completeness=True)
            result["completeness_max_relative_gap"] = float(np.max(comp.relative_gap))
        else:
            rows["occlusion"] = ex.occlusion(x)
    if out is not None:
        from dlkit.explain import plots

        fig = plots.plot_attributions(
            x, rows, labels=result["labels"], predictions=result["predictions"]
        )
        fig.savefig(out, dpi=100)
        result["out"] = str(out)
    return result
