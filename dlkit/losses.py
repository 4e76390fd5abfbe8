"""Losses, thin over `optax.losses`, as small frozen objects the step can close over.

A loss maps the model's outputs and the batch's labels to one value per example, and names
the per-example metrics worth averaging alongside it:

    loss = dlkit.losses.make_loss("softmax_cross_entropy", label_smoothing=0.1)
    per_example = loss(logits, labels)          # (B,)
    extra = loss.metrics(logits, labels)        # {"accuracy": (B,)}

The step weights both by the batch's mask (padding rows weigh 0), so every metric is a mean
over real examples whatever the device count.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class SoftmaxCrossEntropy:
    """Cross-entropy on integer labels, optionally with label smoothing.

    outputs: logits (B, K) float; labels: (B,) int in [0, K).
    """

    label_smoothing: float = 0.0  # in [0, 1): mass moved uniformly onto all classes

    def __call__(self, logits: jax.Array, labels: jax.Array) -> jax.Array:
        logits = logits.astype(jnp.float32)
        if self.label_smoothing == 0.0:
            return optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels)
        k = logits.shape[-1]
        targets = optax.smooth_labels(jax.nn.one_hot(labels, k), self.label_smoothing)
        return optax.losses.softmax_cross_entropy(logits, targets)  # (B,)

    def metrics(self, logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
        return {"accuracy": (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)}


@dataclasses.dataclass(frozen=True)
class SquaredError:
    """Squared error, averaged over each example's output dimensions.

    outputs: (B, ...) float; labels: same shape (a (B,) target is matched to (B, 1) outputs).
    """

    def __call__(self, predictions: jax.Array, targets: jax.Array) -> jax.Array:
        predictions = predictions.astype(jnp.float32)
        targets = targets.astype(jnp.float32).reshape(predictions.shape)
        err = optax.losses.squared_error(predictions, targets)
        return err.reshape(err.shape[0], -1).mean(axis=-1)  # (B,)

    def metrics(self, predictions: jax.Array, targets: jax.Array) -> dict[str, jax.Array]:
        return {}


@dataclasses.dataclass(frozen=True)
class CustomLoss:
    """Your own loss and metrics, as `fit(cfg, loss_fn=..., metrics=...)` takes them.

    loss_fn: `loss_fn(outputs, labels) -> (B,)`: one loss value per example (the step weights
      them by the batch's mask and averages); outputs are the model's, labels the batch's.
    metric_fns: (name, `fn(outputs, labels) -> (B,)`) pairs, logged as train/<name> and
      eval/<name>, beside the metrics of `loss_fn` when it is a dlkit loss (e.g. accuracy).
    All must be jax-traceable (jnp, no Python branches on values).
    """

    loss_fn: Callable
    metric_fns: tuple[tuple[str, Callable], ...] = ()

    def __call__(self, outputs: jax.Array, labels: jax.Array) -> jax.Array:
        return self.loss_fn(outputs, labels)

    def metrics(self, outputs: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
        own = getattr(self.loss_fn, "metrics", None)
        out = dict(own(outputs, labels)) if own is not None else {}
        out.update({name: fn(outputs, labels) for name, fn in self.metric_fns})
        return out


# Logged by dlkit itself as train/<name> (and eval/loss): a metric of yours under one of these
# names would replace dlkit's number in one place and not in another.
RESERVED_METRIC_NAMES = ("loss", "grad_norm", "learning_rate", "skipped_steps")


def custom(loss_fn=None, metrics=None, default=None):
    """`CustomLoss` of `loss_fn` (None = `default`, the config's loss) and `metrics`
    ({name: fn}); `default` itself when neither is given."""
    if loss_fn is None and not metrics:
        return default
    if metrics is not None and not isinstance(metrics, dict):
        raise ValueError(f"metrics: expected a dict {{name: fn}}, got {type(metrics).__name__}")
    for name in metrics or {}:
        if not isinstance(name, str) or not name:
            raise ValueError(f"metrics: expected names that are non-empty strings, got {name!r}")
        if name in RESERVED_METRIC_NAMES:
            raise ValueError(
                f"metrics: expected a name other than {', '.join(RESERVED_METRIC_NAMES)} "
                f"(dlkit logs train/{name} itself), got {name!r}"
            )
    for name, fn in {"loss_fn": loss_fn or default, **(metrics or {})}.items():
        if not callable(fn):
            raise ValueError(f"{name}: expected a function (outputs, labels) -> (B,), got {fn!r}")
    return CustomLoss(loss_fn or default, tuple((metrics or {}).items()))


LOSSES = {"softmax_cross_entropy": SoftmaxCrossEntropy, "squared_error": SquaredError}


def make_loss(name: str, *, label_smoothing: float = 0.0):
    """Builds the loss `name` (see `LOSSES`)."""
    if name == "softmax_cross_entropy":
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(
                f"loss.label_smoothing: expected a float in [0, 1), got {label_smoothing}"
            )
        return SoftmaxCrossEntropy(label_smoothing=label_smoothing)
    if name == "squared_error":
        return SquaredError()
    raise ValueError(f"loss.name: expected one of {sorted(LOSSES)}, got {name!r}")


def from_config(section):
    """`make_loss` with the fields of a config's `loss` section (`cfg.loss`) as its arguments.

    Read by attribute, so any object with `name` and `label_smoothing` works (this module does
    not import the config).

    Args:
      section: the `loss` section.
    Returns:
      The loss object (`SoftmaxCrossEntropy` or `SquaredError`).
    """
    return make_loss(section.name, label_smoothing=section.label_smoothing)
