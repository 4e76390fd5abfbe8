"""XLA:CPU compiler options of the train and eval steps (`train.xla_cpu_ynn_fusions`).

    options = dlkit.xla_cpu.compiler_options("individual_dot,reduce")
    jax.jit(step, compiler_options=dlkit.xla_cpu.usable_compiler_options(options, "cpu"))

XLA:CPU hands some operations to the YNNPACK library. Its convolutions are slower than XLA's
own convolution emitter on the convolutional models here, while its dots speed up the dense
layers, so dlkit's default keeps dots and reductions and leaves convolutions to XLA
(docs/performance.md, "XLA:CPU library fusions", has the measurements and the command). The
options apply to CPU devices only: GPU and TPU programs compile with their platform's defaults.
"""

import functools
import warnings

import jax
import numpy as np

# XLA's LibraryFusionType values (DebugOptions.xla_cpu_experimental_ynn_fusion_type).
YNN_FUSION_TYPES = ("dot", "eltwise", "individual_convolution", "individual_dot", "reduce")
DEFAULT_YNN_FUSIONS = "individual_dot,reduce"


def compiler_options(ynn_fusions: str = DEFAULT_YNN_FUSIONS) -> dict[str, str]:
    """XLA compiler options for CPU programs from `train.xla_cpu_ynn_fusions`.

    Args:
      ynn_fusions: which operations XLA:CPU may hand to YNNPACK: a comma list of
        `YNN_FUSION_TYPES`, "none" (no YNNPACK fusions), or "xla" (no option passed: XLA's own
        default, or whatever XLA_FLAGS sets).
    Returns:
      The options for `jax.jit(..., compiler_options=...)` ({} for "xla").
    Raises:
      ValueError: an unknown value, naming the setting, what it accepts and what it got.
    """
    spec = str(ynn_fusions).strip()
    if spec == "xla":
        return {}
    if spec == "none":
        return {"xla_cpu_experimental_ynn_fusion_type": ""}
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in YNN_FUSION_TYPES]
    if not names or unknown:
        raise ValueError(
            "train.xla_cpu_ynn_fusions: expected xla | none | a comma list of "
            f"{', '.join(YNN_FUSION_TYPES)}, got {ynn_fusions!r}"
        )
    value = ",".join(f"LIBRARY_FUSION_TYPE_{n.upper()}" for n in names)
    return {"xla_cpu_experimental_ynn_fusion_type": value}


@functools.cache
def _rejected_options(options: tuple[tuple[str, str], ...]) -> str | None:
    """Why this jaxlib's XLA:CPU rejects `options` (a tiny probe compile), or None if it
    accepts them. The YNNPACK option is experimental: a later jaxlib may rename or drop it."""
    try:
        x = jax.device_put(np.float32(0), jax.devices("cpu")[0])
        jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(x).compile()
    except Exception as e:  # noqa: BLE001 - XLA reports an unknown option as a runtime error
        return f"{type(e).__name__}: {e}"
    return None


def usable_compiler_options(options: dict[str, str] | None, platform: str) -> dict[str, str]:
    """`options` for programs on `platform`: {} unless it is "cpu" (they are XLA:CPU options);
    on CPU, `options` if this jaxlib accepts them, else {} and a warning, so that a jaxlib
    without an experimental option compiles with its defaults instead of failing."""
    if not options or platform != "cpu":
        return {}
    why = _rejected_options(tuple(sorted(options.items())))
    if why is None:
        return dict(options)
    warnings.warn(
        f"train.xla_cpu_ynn_fusions: this jaxlib ({jax.__version__}) does not accept the XLA "
        f"options {options} ({why.splitlines()[0]}); compiling with XLA's defaults",
        stacklevel=2,
    )
    return {}
