"""Mixed precision in the zoo models (ResNet, ViT, TransformerLM, AudioClassifier): under the
bfloat16 policy each keeps float32 params, computes its matmuls/convolutions in bfloat16,
returns float32 logits close to the float32 model's, and decodes with a KV cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlkit import models, precision, sampling

# The tiny variants the per-model tests use, with a small batch of inputs each.
CASES = {
    "resnet": (
        {"stage_sizes": (1, 1), "width": 8, "num_classes": 10, "shortcut": "B"},
        lambda key: jax.random.normal(key, (2, 8, 8, 3)),
        "conv_general_dilated",
    ),
    "vit": (
        {"patch_size": 4, "num_layers": 2, "num_heads": 2, "d_model": 16, "num_classes": 10},
        lambda key: jax.random.normal(key, (2, 8, 8, 1)),
        "dot_general",
    ),
    "transformer_lm": (
        {"vocab_size": 11, "num_layers": 2, "num_heads": 2, "d_model": 16, "max_len": 32},
        lambda key: jax.random.randint(key, (2, 8), 0, 11),
        "dot_general",
    ),
    "audio_cnn": (
        {"features": (4, 8), "num_mels": 32, "num_classes": 10},
        lambda key: jax.random.normal(key, (2, 4000)) * 0.1,
        "conv_general_dilated",
    ),
}


def _operand_dtypes(closed_jaxpr, primitive):
    """The operand dtypes of every `primitive` equation, nested jaxprs (jit, remat) included."""
    found = []

    def walk(jaxpr):
        jaxpr = getattr(jaxpr, "jaxpr", jaxpr)  # a ClosedJaxpr's Jaxpr
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == primitive:
                found.append({str(v.aval.dtype) for v in eqn.invars})
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    if hasattr(getattr(sub, "jaxpr", sub), "eqns"):
                        walk(sub)

    walk(closed_jaxpr.jaxpr)
    return found


def _setup(name):
    options, make_input, op = CASES[name]
    module = models.build(name, **options)
    x = make_input(jax.random.key(1))
    variables = jax.jit(lambda x: module.init(jax.random.key(0), x, train=False))(x)
    return module, variables, x, op


@pytest.mark.parametrize("name", sorted(CASES))
def test_bfloat16_policy_keeps_float32_params_and_outputs(name):
    module, variables, x, op = _setup(name)
    low = precision.apply_to_module(precision.get_policy("bfloat16"), module)
    assert low.dtype == jnp.bfloat16 and module.dtype == jnp.float32

    # Same params whichever dtype the module computes in: init gives float32 params.
    low_variables = jax.eval_shape(lambda: low.init(jax.random.key(0), x, train=False))
    assert {v.dtype for v in jax.tree.leaves(low_variables)} == {jnp.dtype("float32")}
    assert jax.tree.structure(low_variables) == jax.tree.structure(variables)

    def apply(m):
        return jax.jit(lambda v, x: m.apply(v, x, train=False))

    ref = apply(module)(variables, x)
    got = apply(low)(variables, x)
    assert got.dtype == jnp.float32 and got.shape == ref.shape
    assert bool(jnp.all(jnp.isfinite(got)))
    scale = float(jnp.max(jnp.abs(ref))) + 1e-6
    assert float(jnp.max(jnp.abs(got - ref))) < 5e-2 * scale
    assert not np.array_equal(np.asarray(got), np.asarray(ref))  # really a different precision

    # Every matmul/convolution takes bfloat16 operands (attention may accumulate its logits in
    # float32, as jax.nn.dot_product_attention does); the float32 model has no bfloat16 at all.
    ops = _operand_dtypes(jax.make_jaxpr(lambda v: low.apply(v, x, train=False))(variables), op)
    assert ops and all(dtypes == {"bfloat16"} for dtypes in ops), (name, ops)
    jaxpr32 = str(jax.make_jaxpr(lambda v: module.apply(v, x, train=False))(variables))
    assert "bf16" not in jaxpr32


def test_audio_front_end_stays_float32():
    module, variables, x, _ = _setup("audio_cnn")
    low = precision.apply_to_module(precision.get_policy("bfloat16"), module)
    jaxpr = str(jax.make_jaxpr(lambda v: low.apply(v, x, train=False))(variables))
    fft = [line for line in jaxpr.splitlines() if " fft[" in line]
    assert fft and all(":c64[" in line.split("=")[0] for line in fft)


def test_bfloat16_transformer_decodes_with_a_bfloat16_cache():
    module, variables, prompt, _ = _setup("transformer_lm")
    low = precision.apply_to_module(precision.get_policy("bfloat16"), module)
    cache = jax.eval_shape(lambda: low.init(jax.random.key(0), prompt, train=False, decode=True))
    kv = [v for p, v in jax.tree.leaves_with_path(cache["cache"]) if "index" not in str(p)]
    assert kv and {v.dtype for v in kv} == {jnp.dtype("bfloat16")}
    out = sampling.sample(
        low, variables["params"], prompt[:, :5], jax.random.key(3), max_new_tokens=6, temperature=0
    )
    assert out.logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out.logits)))
    ref = sampling.sample(
        module,
        variables["params"],
        prompt[:, :5],
        jax.random.key(3),
        max_new_tokens=6,
        temperature=0,
    )
    # The first new token's logits come from the same prefix: close at bfloat16 tolerance.
    scale = float(jnp.max(jnp.abs(ref.logits[:, 0]))) + 1e-6
    assert float(jnp.max(jnp.abs(out.logits[:, 0] - ref.logits[:, 0]))) < 5e-2 * scale
