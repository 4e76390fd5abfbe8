"""Attribution methods for a trained classifier: which input features moved its logit.

    ex = dlkit.explain.Explainer.from_workdir("runs/fashion")      # or .from_state(state)
    sal = ex.saliency(images)                                      # (B, H, W, C), |d f / d x|
    sg = ex.smoothgrad(images, key=jax.random.key(0))              # (B, H, W, C)
    ig, comp = ex.integrated_gradients(images, return_completeness=True)
    print(comp.relative_gap.max())                                 # <= 0.01 at the default steps
    occ = ex.occlusion(images, patch=4, stride=2)                  # (B, H, W)

`f` is always the *logit* (pre-softmax output) of the target class: `target=None` explains the
predicted class, an int explains that class for every example, a (B,) int array one class per
example. The model runs in eval mode (`train=False`: no dropout, BatchNorm running statistics),
so examples do not interact and one gradient of the batch's summed target logits gives every
example's gradient at once.

Each method is jitted once per (input shape, settings) and cached by `jax.jit`; the
`trace_counts` attribute counts the traces. Methods that evaluate the model at many points (the
IG path, the SmoothGrad samples, the occlusion positions) go through them in chunks of at most
`max_batch` model inputs (a `lax.scan` over `vmap`ped chunks), so memory stays bounded.
"""

import functools
import math
import pathlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dlkit import evaluation, xla_cpu
from dlkit.explain import attention

DEFAULT_IG_STEPS = 128  # midpoint rule; fewer left visible completeness gaps on small CNNs
DEFAULT_MAX_BATCH = 256


class Completeness(NamedTuple):
    """How well Integrated Gradients' attributions add up (the completeness axiom).

    Attributes:
      attribution_sum: (B,) sum of each example's attributions.
      output_delta: (B,) f(x) - f(baseline), the target logit's change along the path.
      relative_gap: (B,) |attribution_sum - output_delta| / |output_delta|.
    """

    attribution_sum: jax.Array
    output_delta: jax.Array
    relative_gap: jax.Array


def _chunks(num: int, max_batch: int, batch: int) -> tuple[int, int]:
    """(chunk, num_chunks): points per vmapped chunk so that chunk * batch <= max_batch."""
    chunk = max(1, min(num, max_batch // max(batch, 1)))
    return chunk, math.ceil(num / chunk)


class Explainer:
    """Attributions for a classifier `apply_fn(variables, x, train=False) -> (B, K)` logits.

    Build it from a `TrainState` (`Explainer.from_state`), a run directory
    (`Explainer.from_workdir`) or an apply function and its variables
    (`Explainer(apply_fn, variables)`).

    Every method takes inputs x (B, ...) float and returns float arrays with x's shape
    (occlusion: (B, H, W)). Attributions are computed in float32 (float64 when
    `jax_enable_x64` is on).

    Attributes:
      trace_counts: {method: number of times it was traced}; one per new input shape/setting.
      max_batch: most model inputs evaluated at once by the multi-point methods.
      xla_cpu_ynn_fusions: on CPU, which operations XLA may hand to YNNPACK, as
        `train.xla_cpu_ynn_fusions` (default: not convolutions; "xla" = XLA's default).
    """

    def __init__(
        self,
        apply_fn: Callable,
        variables: Any,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        xla_cpu_ynn_fusions: str = xla_cpu.DEFAULT_YNN_FUSIONS,
    ):
        if not callable(apply_fn):
            raise TypeError(f"Explainer.apply_fn: expected a callable, got {type(apply_fn)}")
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"Explainer.max_batch: expected an int >= 1, got {max_batch!r}")
        self.apply_fn = apply_fn
        self.variables = variables
        self.max_batch = max_batch
        self.xla_cpu_ynn_fusions = xla_cpu_ynn_fusions
        self.trace_counts: dict[str, int] = {}
        self._dtype = jnp.result_type(float)  # float32, or float64 under jax_enable_x64
        # On CPU, the same XLA:CPU library choice as training (`train.xla_cpu_ynn_fusions`):
        # the attribution methods are mostly gradients of the model, convolutions included.
        options = xla_cpu.usable_compiler_options(
            xla_cpu.compiler_options(xla_cpu_ynn_fusions), jax.default_backend()
        )
        jit = functools.partial(jax.jit, compiler_options=options or None)
        self._jitted = {
            "logits": jit(self._logits_impl),
            "gradients": jit(self._gradients_impl),
            "smoothgrad": jit(self._smoothgrad_impl, static_argnames=("num_samples", "absolute")),
            "integrated_gradients": jit(self._ig_impl, static_argnames=("steps",)),
            "occlusion": jit(self._occlusion_impl, static_argnames=("patch", "stride")),
            "attention": jit(functools.partial(attention.attention_maps, apply_fn)),
        }

    @classmethod
    def from_state(cls, state, **kwargs) -> "Explainer":
        """From a `dlkit.TrainState` (e.g. `dlkit.fit(...).state`): params and model state."""
        variables = {"params": state.params, **state.model_state}
        return cls(state.apply_fn, variables, **kwargs)

    @classmethod
    def from_workdir(
        cls, workdir: str | pathlib.Path, step: int | None = None, **kwargs
    ) -> "Explainer":
        """From a run's checkpoint (newest, or `step`), loaded onto one device."""
        state, _ = evaluation.load_checkpoint(workdir, step)
        return cls.from_state(state, **kwargs)

    # ---- the model as a function of the input ----------------------------------------------

    def _count(self, name: str) -> None:
        self.trace_counts[name] = self.trace_counts.get(name, 0) + 1

    def _apply(self, variables, x: jax.Array) -> jax.Array:
        return self.apply_fn(variables, x, train=False).astype(self._dtype)  # (B, K)

    def _target_logits(self, variables, x: jax.Array, target: jax.Array) -> jax.Array:
        logits = self._apply(variables, x)  # (B, K)
        return jnp.take_along_axis(logits, target[:, None], axis=1)[:, 0]  # (B,)

    def _grad(self, variables, x: jax.Array, target: jax.Array) -> jax.Array:
        # Eval mode: examples are independent, so the gradient of the summed target logits
        # is each example's own gradient.
        return jax.grad(lambda z: jnp.sum(self._target_logits(variables, z, target)))(x)

    def _logits_impl(self, variables, x):
        self._count("logits")
        return self._apply(variables, x)

    def _gradients_impl(self, variables, x, target):
        self._count("gradients")
        return self._grad(variables, x, target)

    def _smoothgrad_impl(self, variables, x, target, key, sigma, *, num_samples, absolute):
        self._count("smoothgrad")
        b = x.shape[0]
        axes = tuple(range(1, x.ndim))
        scale = sigma * (jnp.max(x, axis=axes) - jnp.min(x, axis=axes))  # (B,)
        scale = scale.reshape((b,) + (1,) * (x.ndim - 1))
        chunk, num_chunks = _chunks(num_samples, self.max_batch, b)
        keys = jax.random.split(key, chunk * num_chunks).reshape(num_chunks, chunk)
        weights = (jnp.arange(chunk * num_chunks) < num_samples).astype(x.dtype)
        weights = weights.reshape(num_chunks, chunk) / num_samples

        def one(k):
            g = self._grad(variables, x + scale * jax.random.normal(k, x.shape, x.dtype), target)
            return jnp.abs(g) if absolute else g

        def body(total, chunk_in):
            k, w = chunk_in
            g = jax.vmap(one)(k)  # (chunk, B, ...)
            return total + jnp.tensordot(w, g, axes=1), None

        total, _ = jax.lax.scan(body, jnp.zeros_like(x), (keys, weights))
        return total

    def _ig_impl(self, variables, x, target, baseline, *, steps):
        self._count("integrated_gradients")
        b = x.shape[0]
        chunk, num_chunks = _chunks(steps, self.max_batch, b)
        # Midpoint rule: alpha_k = (k + 1/2) / steps, each with weight 1 / steps. Padding
        # points (to fill the last chunk) get weight 0.
        index = jnp.arange(chunk * num_chunks)
        alphas = ((index + 0.5) / steps).astype(x.dtype).reshape(num_chunks, chunk)
        weights = ((index < steps) / steps).astype(x.dtype).reshape(num_chunks, chunk)
        diff = x - baseline  # (B, ...)

        def one(alpha):
            return self._grad(variables, baseline + alpha * diff, target)

        def body(total, chunk_in):
            a, w = chunk_in
            g = jax.vmap(one)(a)  # (chunk, B, ...)
            return total + jnp.tensordot(w, g, axes=1), None

        mean_grad, _ = jax.lax.scan(body, jnp.zeros_like(x), (alphas, weights))
        attributions = diff * mean_grad
        f_x = self._target_logits(variables, x, target)
        f_b = self._target_logits(variables, baseline, target)
        return attributions, f_x - f_b

    def _occlusion_impl(self, variables, x, target, baseline_value, *, patch, stride):
        self._count("occlusion")
        b, h, w = x.shape[:3]
        (ph, pw), (sh, sw) = patch, stride
        rows = jnp.arange(0, h - ph + 1, sh)
        cols = jnp.arange(0, w - pw + 1, sw)
        corners = jnp.stack(jnp.meshgrid(rows, cols, indexing="ij"), -1).reshape(-1, 2)  # (P, 2)
        num = corners.shape[0]
        chunk, num_chunks = _chunks(num, self.max_batch, b)
        pad = chunk * num_chunks - num
        valid = jnp.concatenate([jnp.ones(num, x.dtype), jnp.zeros(pad, x.dtype)])
        corners = jnp.concatenate([corners, jnp.zeros((pad, 2), corners.dtype)])
        f_x = self._target_logits(variables, x, target)  # (B,)
        ones = jnp.ones((ph, pw), x.dtype)

        def one(corner):
            mask = jax.lax.dynamic_update_slice(jnp.zeros((h, w), x.dtype), ones, corner)
            m = mask.reshape((1, h, w) + (1,) * (x.ndim - 3))  # broadcast over channels
            occluded = x * (1 - m) + baseline_value * m
            drop = f_x - self._target_logits(variables, occluded, target)  # (B,)
            return drop[:, None, None] * mask, mask  # (B, H, W), (H, W)

        def body(carry, chunk_in):
            total, count = carry
            c, v = chunk_in
            drops, masks = jax.vmap(one)(c)  # (chunk, B, H, W), (chunk, H, W)
            return (total + jnp.tensordot(v, drops, 1), count + jnp.tensordot(v, masks, 1)), None

        init = (jnp.zeros((b, h, w), x.dtype), jnp.zeros((h, w), x.dtype))
        xs = (corners.reshape(num_chunks, chunk, 2), valid.reshape(num_chunks, chunk))
        (total, count), _ = jax.lax.scan(body, init, xs)
        return total / jnp.maximum(count, 1)  # mean drop over the patches covering each pixel

    # ---- argument checks (before anything compiles) ----------------------------------------

    def _inputs(self, x, name: str = "x") -> jax.Array:
        shape = np.shape(x)
        dtype = np.result_type(x) if not isinstance(x, jax.Array) else x.dtype
        if len(shape) < 2:
            raise ValueError(f"{name}: expected a batch (B, ...) of inputs, got shape {shape}")
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(
                f"{name}: expected float inputs (attributions need gradients with respect to "
                f"the input), got dtype {dtype}"
            )
        out = jax.eval_shape(self._apply, self.variables, jax.ShapeDtypeStruct(shape, self._dtype))
        if out.shape[:1] != shape[:1] or len(out.shape) != 2:
            raise ValueError(
                f"Explainer: expected the model to return logits (B, num_classes) for inputs "
                f"{shape}, got outputs of shape {out.shape}"
            )
        self._num_classes = out.shape[1]
        return jnp.asarray(x, self._dtype)

    def _target(self, x: jax.Array, target) -> jax.Array:
        b, k = x.shape[0], self._num_classes
        if target is None:
            return jnp.argmax(self.logits(x), axis=-1).astype(jnp.int32)
        t = np.asarray(target)
        if not np.issubdtype(t.dtype, np.integer) or t.shape not in ((), (b,)):
            raise ValueError(
                f"target: expected None, an int or a ({b},) int array, got {t.dtype} {t.shape}"
            )
        if np.any(t < 0) or np.any(t >= k):
            raise ValueError(f"target: expected classes in [0, {k}), got {t.min()}..{t.max()}")
        return jnp.broadcast_to(jnp.asarray(t, jnp.int32), (b,))

    def _baseline(self, x: jax.Array, baseline) -> jax.Array:
        if baseline is None:
            return jnp.zeros_like(x)
        shape = np.shape(baseline)
        if shape not in ((), x.shape, x.shape[1:]):
            raise ValueError(
                f"baseline: expected None, a scalar, or shape {x.shape} or {x.shape[1:]}, "
                f"got {shape}"
            )
        return jnp.broadcast_to(jnp.asarray(baseline, x.dtype), x.shape)

    # ---- public methods --------------------------------------------------------------------

    def logits(self, x) -> jax.Array:
        """The model's logits (B, K) in eval mode."""
        x = self._inputs(x)
        return self._jitted["logits"](self.variables, x)

    def attention_maps(self, x) -> list[jax.Array]:
        """Per-layer attention weights [(B, heads, Tq, Tk)] of a ViT or Transformer LM (any
        input dtype: images or tokens). See `dlkit.explain.attention_maps`."""
        return self._jitted["attention"](self.variables, jnp.asarray(x))

    def predict(self, x) -> jax.Array:
        """Predicted classes (B,) int32."""
        return jnp.argmax(self.logits(x), axis=-1).astype(jnp.int32)

    def saliency(self, x, target=None, *, absolute: bool = True) -> jax.Array:
        """Gradient saliency (Simonyan et al. 2014): d f_target / d x.

        Args:
          x: (B, ...) float inputs.
          target: None (predicted class), an int, or (B,) ints.
          absolute: return |gradient| (the saliency map); False = the signed gradient.
        Returns:
          (B, ...) like x.
        """
        x = self._inputs(x)
        g = self._jitted["gradients"](self.variables, x, self._target(x, target))
        return jnp.abs(g) if absolute else g

    def gradient_x_input(self, x, target=None) -> jax.Array:
        """x * d f_target / d x (signed): a first-order estimate of each feature's contribution.

        Returns:
          (B, ...) like x.
        """
        x = self._inputs(x)
        return x * self._jitted["gradients"](self.variables, x, self._target(x, target))

    def smoothgrad(
        self,
        x,
        target=None,
        *,
        key: jax.Array,
        num_samples: int = 32,
        sigma: float = 0.15,
        absolute: bool = True,
    ) -> jax.Array:
        """SmoothGrad (Smilkov et al. 2017): the saliency averaged over noisy copies of x.

        Args:
          x: (B, ...) float inputs.
          target: None (predicted class), an int, or (B,) ints.
          key: a `jax.random.key` for the noise.
          num_samples: noisy copies per example.
          sigma: noise standard deviation as a fraction of each example's value range
            (max - min); 0.1-0.2 is the usual choice.
          absolute: average |gradient| (True) or the signed gradient.
        Returns:
          (B, ...) like x.
        """
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples: expected an int >= 1, got {num_samples!r}")
        if not sigma >= 0:
            raise ValueError(f"sigma: expected a fraction >= 0, got {sigma!r}")
        x = self._inputs(x)
        return self._jitted["smoothgrad"](
            self.variables,
            x,
            self._target(x, target),
            key,
            jnp.asarray(sigma, x.dtype),
            num_samples=num_samples,
            absolute=absolute,
        )

    def integrated_gradients(
        self,
        x,
        target=None,
        *,
        baseline=None,
        steps: int = DEFAULT_IG_STEPS,
        return_completeness: bool = False,
    ):
        """Integrated Gradients (Sundararajan et al. 2017) from `baseline` to x.

        attribution_i = (x_i - b_i) * mean over alpha of d f / d x_i at b + alpha (x - b),
        with the integral over alpha in [0, 1] taken by the midpoint rule with `steps` points.
        Completeness: the attributions of an example sum to f(x) - f(baseline), up to the
        midpoint rule's error, which more steps shrink (the default's gap:
        docs/performance.md, "Integrated Gradients steps").

        Args:
          x: (B, ...) float inputs.
          target: None (predicted class), an int, or (B,) ints.
          baseline: None (zeros, e.g. a black image), a scalar, or an array of shape x.shape
            or x.shape[1:].
          steps: points on the path; more = a smaller completeness gap, linearly more time.
          return_completeness: also return a `Completeness` of the attributions.
        Returns:
          attributions (B, ...) like x; with `return_completeness`, (attributions, Completeness).
        """
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
        x = self._inputs(x)
        baseline = self._baseline(x, baseline)
        attributions, delta = self._jitted["integrated_gradients"](
            self.variables, x, self._target(x, target), baseline, steps=steps
        )
        if not return_completeness:
            return attributions
        total = jnp.sum(attributions.reshape(x.shape[0], -1), axis=1)
        gap = jnp.abs(total - delta) / jnp.maximum(jnp.abs(delta), jnp.finfo(x.dtype).tiny)
        return attributions, Completeness(total, delta, gap)

    def occlusion(
        self,
        x,
        target=None,
        *,
        patch: int | tuple[int, int] = 4,
        stride: int | tuple[int, int] = 2,
        baseline_value: float = 0.0,
    ) -> jax.Array:
        """Occlusion (Zeiler and Fergus 2014): how much the target logit drops when a patch is
        replaced by `baseline_value`, averaged over the patch positions covering each pixel.

        Args:
          x: (B, H, W, C) or (B, H, W) float images.
          target: None (predicted class), an int, or (B,) ints.
          patch: (height, width) of the occluding square/rectangle, pixels.
          stride: step between patch positions, pixels.
          baseline_value: what the patch is filled with.
        Returns:
          (B, H, W): mean f(x) - f(x occluded) over the patches covering each pixel (0 where
          no patch reaches).
        """
        x = self._inputs(x)
        if x.ndim not in (3, 4):
            raise ValueError(f"x: expected images (B, H, W[, C]) for occlusion, got {x.shape}")
        patch, stride = _pair(patch, "patch"), _pair(stride, "stride")
        if patch[0] > x.shape[1] or patch[1] > x.shape[2]:
            raise ValueError(f"patch: expected at most the image size {x.shape[1:3]}, got {patch}")
        return self._jitted["occlusion"](
            self.variables,
            x,
            self._target(x, target),
            jnp.asarray(baseline_value, x.dtype),
            patch=patch,
            stride=stride,
        )


def _pair(value, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v >= 1 for v in pair):
        raise ValueError(f"{name}: expected an int >= 1 or a pair of them, got {value!r}")
    return pair
