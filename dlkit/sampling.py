"""Autoregressive sampling from a language model with a KV cache, compiled as one function.

    module = dlkit.models.TransformerLM(vocab_size=96, max_len=256)
    out = dlkit.sampling.sample(module, params, prompt, jax.random.key(0),
                                max_new_tokens=200, temperature=0.8, top_k=20)
    out.tokens      # (B, max_new_tokens) int32, the continuation
    out.logits      # (B, max_new_tokens, V) float32, the logits each token was drawn from

One `jax.jit`-compiled program does everything: it makes an empty cache, runs the prompt
through the model once (prefill: every prompt position's keys and values go into the cache),
then a `lax.scan` of single-token decode steps, each reading the cache instead of recomputing
the prefix. The module must accept `decode=True` and keep its cache in the "cache" collection
(as `TransformerLM` does). `temperature` is a traced value (changing it does not recompile);
`top_k` and `max_new_tokens` are static.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Samples(NamedTuple):
    """What `sample` returns.

    Attributes:
      tokens: (B, N) int32, the N new tokens.
      logits: (B, N, V) float32, the model's logits each new token was chosen from.
    """

    tokens: jax.Array
    logits: jax.Array


def choose_token(
    logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: int = 0
) -> jax.Array:
    """Picks one token per row: greedy when `temperature` is 0, else a draw from the softmax of
    `logits / temperature`, restricted to the `top_k` largest logits when `top_k` > 0.

    Args:
      logits: (B, V) float.
      key: a PRNG key.
      temperature: scalar float >= 0.
      top_k: static int; 0 (or >= V) = all tokens.
    Returns:
      (B,) int32 tokens.
    """
    logits = logits.astype(jnp.float32)
    if 0 < top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # (B, 1), the k-th largest logit
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    greedy = jnp.argmax(logits, axis=-1)  # (B,)
    drawn = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6), axis=-1)
    return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("module", "max_new_tokens", "top_k"))
def _sample(module, params, prompt, key, temperature, *, max_new_tokens, top_k):
    b, p = prompt.shape  # (B, P)
    # An empty cache of the right shapes; the init itself is discarded (XLA removes it).
    shapes = jax.eval_shape(
        lambda: module.init(jax.random.key(0), prompt[:, :1], train=False, decode=True)
    )
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])

    def forward(cache, tokens):
        logits, updated = module.apply(
            {"params": params, "cache": cache}, tokens, train=False, decode=True, mutable=["cache"]
        )
        return updated["cache"], logits[:, -1]  # (B, V), the next token's logits

    cache, logits = forward(cache, prompt)  # prefill

    def decode_step(carry, step_key):
        cache, logits = carry
        token = choose_token(logits, step_key, temperature, top_k)  # (B,)
        cache, next_logits = forward(cache, token[:, None])
        return (cache, next_logits), (token, logits)

    keys = jax.random.split(key, max_new_tokens)
    _, (tokens, all_logits) = jax.lax.scan(decode_step, (cache, logits), keys)
    return Samples(tokens.T, jnp.transpose(all_logits, (1, 0, 2)))  # (B, N), (B, N, V)


def sample(
    module,
    params,
    prompt,
    key: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
) -> Samples:
    """Continues `prompt` by `max_new_tokens` tokens with a KV cache, in one compiled call.

    Args:
      module: a language model taking `(tokens, train=False, decode=True)` with a "cache"
        collection and a `max_len` field (e.g. `dlkit.models.TransformerLM`).
      params: its "params" collection.
      prompt: (B, P) int tokens, P >= 1.
      key: a PRNG key for the draws.
      max_new_tokens: N >= 1; P + N must not exceed `module.max_len`.
      temperature: >= 0; 0 = greedy (argmax).
      top_k: >= 0; sample only among the k most likely tokens; 0 = all.
    Returns:
      `Samples(tokens (B, N) int32, logits (B, N, V) float32)`.
    """
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt: expected tokens (B, P) with P >= 1, got shape {prompt.shape}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens}")
    if prompt.shape[1] + max_new_tokens > module.max_len:
        raise ValueError(
            f"max_new_tokens: prompt length {prompt.shape[1]} + max_new_tokens must be at most "
            f"the model's max_len={module.max_len}, got {max_new_tokens}"
        )
    if temperature < 0:
        raise ValueError(f"temperature: expected a float >= 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k: expected an int >= 0, got {top_k}")
    return _sample(
        module,
        params,
        prompt,
        key,
        jnp.float32(temperature),
        max_new_tokens=int(max_new_tokens),
        top_k=int(top_k),
    )


def sample_text(
    workdir,
    prompt: str,
    length: int,
    *,
    temperature: float = 0.8,
    top_k: int = 20,
    seed: int = 0,
    step: int | None = None,
) -> str:
    """Exactly `length` new tokens continuing `prompt`, from a language model's workdir
    (`dlkit.sample`, `dlkit sample WORKDIR --prompt TEXT --length N`).

    The model sees at most `max_len` tokens, so a continuation longer than that is drawn in
    pieces: when the context is full, it keeps its last `max_len // 2` tokens and goes on.

    Args:
      workdir: a run of a language model on text: characters (data.name=text or kjv) or
        BPE tokens (data.name=bpe_corpus, decoded with the corpus's tokenizer.json).
      prompt: the text to continue; for characters, each must be in the run's vocabulary.
      length: N >= 1 new tokens (characters for a character-level run).
      temperature, top_k: as for `sample`; seed: the PRNG seed of the draws.
      step: the checkpoint; None = the newest.
    Returns:
      the text of the N new tokens (without the prompt).
    """
    import numpy as np

    from dlkit import evaluation, parallel

    if not isinstance(length, int) or length < 1:
        raise ValueError(f"length: expected an int >= 1, got {length!r}")
    if not prompt:
        raise ValueError("prompt: expected at least one character, got ''")
    strategy = parallel.make_strategy("jit", num_devices=1)
    state, cfg = evaluation.load_checkpoint(workdir, step, strategy=strategy)
    c = evaluation.build_for(workdir, cfg, strategy)
    vocab = getattr(c.eval_source, "vocab", None)
    if vocab is None or not hasattr(c.module, "max_len"):
        raise ValueError(
            "workdir: expected a language model run on text (data.name=text, kjv or "
            f"bpe_corpus), got "
            f"data.name={cfg.data.name!r} with model {cfg.model.name!r}"
        )
    module, keep = c.module, c.module.max_len // 2
    params = jax.device_get(state.params)
    context = np.asarray(vocab.encode(prompt), np.int32)
    new: list[np.ndarray] = []
    key = jax.random.key(seed)
    remaining = length
    while remaining:
        if module.max_len - len(context) < min(remaining, keep):
            context = context[-keep:]
        n = min(module.max_len - len(context), remaining)
        key, draw = jax.random.split(key)
        out = sample(
            module,
            params,
            context[None],
            draw,
            max_new_tokens=n,
            temperature=temperature,
            top_k=top_k,
        )
        tokens = np.asarray(out.tokens[0])
        new.append(tokens)
        context = np.concatenate([context, tokens])
        remaining -= n
    return vocab.decode(np.concatenate(new))
