"""Interpretability for dlkit models: attributions, attention maps and their plots.

    import dlkit
    ex = dlkit.explain.Explainer.from_workdir("runs/fashion_mnist_cnn")  # or .from_state(state)
    ig, comp = ex.integrated_gradients(images, return_completeness=True)  # (B, 28, 28, 1)
    fig = dlkit.explain.plot_attributions(images, {"IG": ig, "saliency": ex.saliency(images)})

    maps = dlkit.explain.attention_maps(state.apply_fn, variables, images)  # ViT / LM
    heat = dlkit.explain.rollout_image(maps, (32, 32), patch_size=4)

The plot helpers need matplotlib (`pip install dlkit[plots]`); it is imported when they are
first called. See docs/explain.md.
"""

from dlkit.explain.attention import attention_maps, attention_rollout, rollout_image
from dlkit.explain.attribution import DEFAULT_IG_STEPS, Completeness, Explainer


def plot_attributions(*args, **kwargs):
    """See `dlkit.explain.plots.plot_attributions` (imports matplotlib on first use)."""
    from dlkit.explain import plots

    return plots.plot_attributions(*args, **kwargs)


__all__ = [
    "DEFAULT_IG_STEPS",
    "Completeness",
    "Explainer",
    "attention_maps",
    "attention_rollout",
    "plot_attributions",
    "rollout_image",
]
