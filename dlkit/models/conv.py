"""Ways to compute a convolution, behind `nn.Conv(conv_general_dilated=...)`.

    conv = nn.Conv(64, (3, 3), padding="SAME", conv_general_dilated=conv_function("matmul_grad"))

Every variant is the same function as `jax.lax.conv_general_dilated` (same params, outputs and
gradients, to float rounding; tests/test_models.py checks both). They differ in how XLA runs
them, which matters on XLA:CPU, where the gradients of a convolution (the kernel gradient
most) can be the slowest part of a small CNN's training step (figures per layer and per
variant: docs/performance.md, "Convolution variants"):

- "xla": `lax.conv_general_dilated`; XLA differentiates it into two more convolutions.
- "patches": the kh*kw shifted views concatenated on channels, then one matmul; its gradient
  is XLA's transpose of the slicing, slow for the input gradient.
- "matmul_grad": the forward of "patches" with a custom VJP: the kernel gradient is the patch
  matrix (kept from the forward) transposed times the output gradient, one long matmul that
  a CPU runs at its matmul speed, and the input gradient is XLA's own transpose of the
  convolution, faster than the transpose of the patch slicing.

"matmul_grad" and "patches" handle stride-1, undilated, ungrouped convolutions on NHWC inputs
and HWIO kernels (what `nn.Conv` passes for such layers), with any padding; anything else falls
back to `lax.conv_general_dilated`.
"""

import functools

import jax
import jax.numpy as jnp

CONV_IMPLS = ("xla", "patches", "matmul_grad")
_NHWC = ("NHWC", "HWIO", "NHWC")


def _is_plain(lhs, window_strides, padding, dimension_numbers, options) -> bool:
    """Stride 1, no dilation, no groups, NHWC/HWIO, 4-D: what the variants handle."""
    if dimension_numbers is not None and not _is_nhwc(dimension_numbers):
        return False
    return (
        all(s == 1 for s in window_strides)
        and all(d == 1 for d in (options.get("lhs_dilation") or (1,)))
        and all(d == 1 for d in (options.get("rhs_dilation") or (1,)))
        and options.get("feature_group_count", 1) == 1
        and options.get("batch_group_count", 1) == 1
        and lhs.ndim == 4
    )


def _explicit(padding, lhs, rhs, window_strides):
    """ "SAME" / "VALID" (what `nn.Conv(padding="SAME")` passes) as ((lo, hi), (lo, hi))."""
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    return tuple(tuple(int(v) for v in p) for p in padding)


def _is_nhwc(dimension_numbers) -> bool:
    if isinstance(dimension_numbers, tuple) and all(isinstance(d, str) for d in dimension_numbers):
        return tuple(dimension_numbers) == _NHWC
    spec = jax.lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), _NHWC)
    return dimension_numbers == spec


def _patches(x: jax.Array, kh: int, kw: int, h: int, w: int) -> jax.Array:
    """(B, Hp, Wp, C) padded input -> (B, h, w, kh*kw*C), ordered (kh, kw, C)."""
    views = [x[:, i : i + h, j : j + w, :] for i in range(kh) for j in range(kw)]
    return jnp.concatenate(views, axis=-1)


def _pad(lhs, padding):
    return jnp.pad(lhs, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))


def _stride1_variant(body):
    """A `conv_general_dilated` that runs `body(lhs, rhs, pads, precision, preferred_type)` for
    the convolutions `_is_plain` accepts (padding made explicit) and the lax function for the
    rest."""

    @functools.wraps(body)
    def conv(lhs, rhs, window_strides, padding, dimension_numbers=None, **options):
        if not _is_plain(lhs, window_strides, padding, dimension_numbers, options):
            return jax.lax.conv_general_dilated(
                lhs, rhs, window_strides, padding, dimension_numbers=dimension_numbers, **options
            )
        padding = _explicit(padding, lhs, rhs, window_strides)
        return body(
            lhs, rhs, padding, options.get("precision"), options.get("preferred_element_type")
        )

    return conv


@_stride1_variant
def patches_conv(lhs, rhs, padding, precision, preferred_element_type):
    """`lax.conv_general_dilated` for NHWC inputs and HWIO kernels, as patches + one matmul.

    Called as the lax function: (lhs, rhs, window_strides, padding, dimension_numbers,
    **options), with lhs (B, H, W, C), rhs (kh, kw, C, O) and padding ((lo, hi), (lo, hi)) or
    "SAME" / "VALID". Returns (B, H', W', O), the same values as the lax function to float
    rounding.
    """
    return _patches_matmul(lhs, rhs, padding, precision, preferred_element_type)[0]


@_stride1_variant
def matmul_grad_conv(lhs, rhs, padding, precision, preferred_element_type):
    """`lax.conv_general_dilated` as `patches_conv`, with the kernel gradient as one matmul
    of the patch matrix and the input gradient from XLA's convolution (a custom VJP).

    Called and returns as `patches_conv`.
    """
    return _conv_custom_vjp(lhs, rhs, padding, precision, preferred_element_type)


def _conv(lhs, rhs, padding, precision, preferred_element_type):
    return jax.lax.conv_general_dilated(
        lhs,
        rhs,
        (1, 1),
        padding,
        dimension_numbers=_NHWC,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )


def _patches_matmul(lhs, rhs, padding, precision, preferred_element_type):
    """The forward of "patches": (B, H, W, C) -> (B, H', W', O), and the patch matrix."""
    kh, kw, c, o = rhs.shape
    x = _pad(lhs, padding)
    h, w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    patches = _patches(x, kh, kw, h, w)  # (B, H', W', kh*kw*C)
    kernel = rhs.reshape(kh * kw * c, o)  # (kh*kw*C, O), the same (kh, kw, C) order
    out = jnp.einsum(
        "bhwk,ko->bhwo",
        patches,
        kernel,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    return out, patches


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_custom_vjp(lhs, rhs, padding, precision, preferred_element_type):
    return _patches_matmul(lhs, rhs, padding, precision, preferred_element_type)[0]


def _conv_fwd(lhs, rhs, padding, precision, preferred_element_type):
    out, patches = _patches_matmul(lhs, rhs, padding, precision, preferred_element_type)
    return out, (lhs, rhs, patches)


def _conv_bwd(padding, precision, preferred_element_type, residuals, g):
    lhs, rhs, patches = residuals
    kh, kw, c, o = rhs.shape
    g = g.astype(lhs.dtype)  # (B, H', W', O)
    # d rhs[u, v, c, o] = sum_{b,i,j} xpad[b, i+u, j+v, c] g[b, i, j, o]: one matmul whose
    # contraction runs over every output position.
    # Written as g^T @ patches: XLA then transposes g (B*H'*W' x O) rather than the patch
    # matrix, which is kh*kw*C/O times larger and whose transpose XLA would materialise.
    d_rhs = jnp.einsum("bhwo,bhwk->ok", g, patches, precision=precision).T  # (kh*kw*C, O)
    d_rhs = d_rhs.reshape(kh, kw, c, o).astype(rhs.dtype)
    # d lhs: XLA's own transpose of the convolution, the fastest of the ways tried (the
    # transpose of the patch slicing, a forward conv with the flipped kernel, one matmul +
    # col2im: docs/performance.md, "Convolution variants").
    _, conv_vjp = jax.vjp(lambda x: _conv(x, rhs, padding, precision, None), lhs)
    (d_lhs,) = conv_vjp(g)
    return d_lhs, d_rhs


_conv_custom_vjp.defvjp(_conv_fwd, _conv_bwd)


def conv_function(impl: str):
    """The `conv_general_dilated` for `nn.Conv` that `impl` names (None = Flax's default).

    Raises:
      ValueError: `impl` is not one of CONV_IMPLS.
    """
    if impl not in CONV_IMPLS:
        raise ValueError(f"model.conv_impl: expected one of {' | '.join(CONV_IMPLS)}, got {impl!r}")
    return {"xla": None, "patches": patches_conv, "matmul_grad": matmul_grad_conv}[impl]
