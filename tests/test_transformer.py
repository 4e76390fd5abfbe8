"""Tests for dlkit.models.transformer and dlkit.sampling: shapes, GPT-2's parameter count,
causality, KV-cached decoding equal to the full model, top-k, and per-token training loss."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dlkit
from dlkit import losses, models, sampling, state, steps
from dlkit.models import transformer

TINY = {"vocab_size": 11, "num_layers": 2, "num_heads": 2, "d_model": 16, "max_len": 32}


def _init(module, t=8, b=2):
    tokens = jax.random.randint(jax.random.key(1), (b, t), 0, module.vocab_size)
    return jax.jit(lambda x: module.init(jax.random.key(0), x, train=False))(tokens), tokens


def _apply(module, variables, tokens):
    # Compiled: one program is faster than the eager op-by-op forward on CPU.
    return jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, tokens)


def test_gpt2_small_parameter_count():
    # GPT-2 small (Radford et al. 2019; Hugging Face "gpt2"): 124,439,808 parameters.
    module = transformer.TransformerLM(
        vocab_size=50257,
        num_layers=12,
        num_heads=12,
        d_model=768,
        max_len=1024,
        positions="learned",
        tie_embeddings=True,
    )
    shapes = jax.eval_shape(
        lambda: module.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32), train=False)
    )
    assert state.param_count(shapes["params"]) == 124_439_808


@pytest.mark.parametrize("positions, tie", [("rotary", True), ("learned", False)])
def test_tiny_shapes_and_pinned_count(positions, tie):
    module = models.build("transformer_lm", **TINY, positions=positions, tie_embeddings=tie)
    variables, tokens = _init(module)
    logits = _apply(module, variables, tokens)
    assert logits.shape == (2, 8, 11) and logits.dtype == jnp.float32
    v, c, layers, max_len = 11, 16, 2, 32
    per_layer = 12 * c * c + 13 * c  # qkv, proj, 2 MLP layers with biases, 2 LayerNorms
    expected = v * c + layers * per_layer + 2 * c
    expected += max_len * c if positions == "learned" else 0
    expected += 0 if tie else v * c
    assert state.param_count(variables["params"]) == expected
    assert expected == {("rotary", True): 6_768, ("learned", False): 7_456}[(positions, tie)]


@pytest.mark.parametrize("positions", ["rotary", "learned"])
def test_attention_is_causal(positions):
    module = transformer.TransformerLM(**TINY, positions=positions)
    variables, tokens = _init(module, t=10)
    changed = tokens.at[:, 6].set((tokens[:, 6] + 1) % 11)
    a = _apply(module, variables, tokens)
    b = _apply(module, variables, changed)
    np.testing.assert_allclose(a[:, :6], b[:, :6], atol=1e-6)
    assert float(jnp.abs(a[:, 6:] - b[:, 6:]).max()) > 1e-4


def test_rotary_embedding_is_relative():
    # Rotating q and k by positions shifts their dot product only by the position difference.
    q, k = jax.random.normal(jax.random.key(0), (2, 1, 1, 1, 8))

    def score(i, j):
        qi = transformer.rotary_embedding(q, jnp.array([i]))
        kj = transformer.rotary_embedding(k, jnp.array([j]))
        return float(jnp.sum(qi * kj))

    assert score(3, 1) == pytest.approx(score(10, 8), rel=1e-5)
    assert score(3, 1) != pytest.approx(score(3, 2), rel=1e-3)


@pytest.mark.parametrize("positions", ["rotary", "learned"])
def test_cached_greedy_decoding_matches_the_full_model(positions):
    module = transformer.TransformerLM(**TINY, positions=positions, tie_embeddings=False)
    variables, prompt = _init(module, t=5)
    out = sampling.sample(
        module, variables["params"], prompt, jax.random.key(3), max_new_tokens=12, temperature=0.0
    )
    assert out.tokens.shape == (2, 12) and out.tokens.dtype == jnp.int32
    assert out.logits.shape == (2, 12, 11)
    # The full model on the whole sequence: position p-1+i predicts new token i.
    sequence = jnp.concatenate([prompt, out.tokens], axis=1)  # (B, 17)
    full = _apply(module, variables, sequence[:, :-1])  # (B, 16, V)
    np.testing.assert_allclose(out.logits, full[:, 4:], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(out.tokens, jnp.argmax(full[:, 4:], axis=-1))


def test_top_k_1_is_greedy_and_top_k_restricts_draws():
    module = transformer.TransformerLM(**TINY)
    variables, prompt = _init(module, t=3)
    params = variables["params"]
    greedy = sampling.sample(
        module, params, prompt, jax.random.key(0), max_new_tokens=10, temperature=0.0
    )
    top1 = sampling.sample(
        module, params, prompt, jax.random.key(5), max_new_tokens=10, temperature=1.0, top_k=1
    )
    np.testing.assert_array_equal(greedy.tokens, top1.tokens)
    # With top_k=3 every draw is among the 3 largest logits it was drawn from.
    draws = sampling.sample(
        module, params, prompt, jax.random.key(7), max_new_tokens=10, temperature=2.0, top_k=3
    )
    ranks = jnp.sum(
        draws.logits > jnp.take_along_axis(draws.logits, draws.tokens[..., None], -1), axis=-1
    )
    assert int(ranks.max()) <= 2
    other = sampling.sample(
        module, params, prompt, jax.random.key(8), max_new_tokens=10, temperature=2.0, top_k=3
    )
    assert not np.array_equal(draws.tokens, other.tokens)


def test_sampling_rejects_a_sequence_longer_than_max_len():
    module = transformer.TransformerLM(**TINY)
    variables, prompt = _init(module, t=30)
    with pytest.raises(ValueError, match="max_len=32"):
        sampling.sample(module, variables["params"], prompt, jax.random.key(0), max_new_tokens=3)
    with pytest.raises(ValueError, match="max_len=32"):
        module.apply(variables, jnp.zeros((1, 33), jnp.int32), train=False)
    with pytest.raises(ValueError, match="num_heads"):
        transformer.TransformerLM(d_model=10, num_heads=4).init(
            jax.random.key(0), jnp.zeros((1, 4), jnp.int32), train=False
        )


def test_train_step_minimises_mean_nats_per_token():
    # (B, T) labels with T != B: the objective is the mean over all real tokens.
    module = transformer.TransformerLM(**TINY)
    b, t = 4, 7
    tokens = jax.random.randint(jax.random.key(2), (b, t + 1), 0, 11)
    batch = {
        "inputs": tokens[:, :-1],
        "labels": tokens[:, 1:],
        "mask": jnp.array([1.0, 1.0, 1.0, 0.0]),  # the last row is padding
    }
    ts = state.create_train_state(module, optax.sgd(1.0), batch["inputs"], seed=0)
    loss_fn = losses.make_loss("softmax_cross_entropy")
    new, metrics = jax.jit(lambda s, x: steps.train_step(s, x, loss_fn=loss_fn))(ts, batch)

    def mean_nats(params):
        logits = module.apply({"params": params}, batch["inputs"][:3], train=False)
        ce = optax.losses.softmax_cross_entropy_with_integer_labels(logits, batch["labels"][:3])
        return jnp.mean(ce)

    want_loss, want_grad = jax.jit(jax.value_and_grad(mean_nats))(ts.params)
    loss = dlkit.metrics.compute(jax.device_get(metrics))["loss"]
    assert loss == pytest.approx(float(want_loss), rel=1e-5)
    assert float(metrics["loss"].count) == 3 * t
    got_grad = jax.tree.map(lambda a, b: a - b, ts.params, new.params)  # sgd(1): -grad
    for g, w in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
