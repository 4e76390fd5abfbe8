"""Train a Flax NNX module with the same engine: NNX's object model behind Linen's init/apply.

    class MLP(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.hidden = nnx.Linear(64, 128, rngs=rngs)
            self.dropout = nnx.Dropout(0.1, rngs=rngs)
            self.out = nnx.Linear(128, 10, rngs=rngs)
        def __call__(self, x):
            return self.out(self.dropout(nnx.relu(self.hidden(x.reshape(x.shape[0], -1)))))

    result = dlkit.fit(cfg, model=MLP(rngs=nnx.Rngs(0)))   # an instance: its own weights
    result.model                                           # the trained MLP, in eval mode

`fit(cfg, model=instance)` wraps the instance with `NNXAdapter.from_module`, which splits it
once; `NNXAdapter(MLP)` (a constructor taking `rngs`) builds a fresh module from the run's seed.

NNX modules are mutable Python objects; the engine needs pure functions of arrays. The adapter
splits the module into its static graph definition and its state (`nnx.split`), and keeps the
state as plain nested dicts: "params" (every `nnx.Param`) and, if there are any, "state" (other
variables such as BatchNorm's `nnx.BatchStat`, which the engine keeps in `model_state`, marks
mutable while training). `apply` merges graph and
state into a fresh module (`nnx.merge`), sets train or eval mode (`module.train()` /
`.eval()`), seeds its random streams from the step's key, calls it, and returns the outputs,
plus the updated "state" when asked. RNG stream state is rebuilt on every call from the
key passed in, so it never enters the TrainState.

BatchNorm under pmap: each device holds B/n rows, so per-device batch statistics would differ
from jit's global-batch ones. Like `dlkit.models.ResNet`, the adapter has a `bn_axis_name`
field that `dlkit.components.module_for_strategy` sets to the mapped axis under pmap; `apply` then
sets `axis_name` on every `nnx.BatchNorm` in the merged module, so its statistics (and their
gradients) are reduced across devices and both strategies compute the same numbers.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.nnx as nnx
import jax
import jax.numpy as jnp


def _concrete(leaf):
    # RNG stream variables of the abstract module: a key and a counter.
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return jax.random.key(0)
    return jnp.zeros(leaf.shape, leaf.dtype)


def _rngs(key: jax.Array) -> nnx.Rngs:
    return nnx.Rngs(params=key, dropout=jax.random.fold_in(key, 1))


@dataclasses.dataclass(frozen=True)
class NNXAdapter:
    """An `nnx.Module` constructor presented as a Linen-style module.

    Attributes:
      make_module: `make_module(rngs: nnx.Rngs) -> nnx.Module`; the module is called as
        `module(x)` with train/eval mode set by `.train()` / `.eval()`.
    """

    make_module: Callable[[nnx.Rngs], nnx.Module] | None = None
    bn_axis_name: str | None = None  # set by the engine under pmap (see the module docstring)
    # A user's module instance: `init` returns its weights rather than new ones, so a model
    # built with the user's own `nnx.Rngs` trains from exactly those weights.
    instance: nnx.Module | None = dataclasses.field(default=None, compare=False)

    @classmethod
    def from_module(cls, module: nnx.Module) -> "NNXAdapter":
        """The adapter for an `nnx.Module` instance (its current weights are the initial ones)."""
        if not isinstance(module, nnx.Module):
            raise TypeError(
                f"NNXAdapter.from_module(module=...): expected an nnx.Module instance, "
                f"got {type(module).__name__}"
            )
        return cls(instance=module)

    def _build(self, key: jax.Array) -> nnx.Module:
        if self.instance is not None:
            return nnx.clone(self.instance)
        return self.make_module(_rngs(key))

    def to_module(self, variables) -> nnx.Module:
        """A new `nnx.Module` holding `variables` ({"params": ..., ["state": ...]} as nested
        dicts, e.g. a trained state's), in eval mode; the adapter's instance is not changed."""
        module = self._build(jax.random.key(0))
        _, params, _, rest = nnx.split(module, nnx.Param, nnx.RngState, ...)
        nnx.replace_by_pure_dict(params, jax.device_get(variables["params"]))
        if "state" in variables:
            nnx.replace_by_pure_dict(rest, jax.device_get(variables["state"]))
        nnx.update(module, params, rest)
        module.eval()
        return module

    def clone(self, **changes) -> "NNXAdapter":
        """A copy with `changes` applied (Linen's `Module.clone` contract)."""
        return dataclasses.replace(self, **changes)

    def _split_abstract(self):
        # The same streams as `init`'s, so `apply` can reseed "dropout".
        abstract = nnx.eval_shape(lambda: self._build(jax.random.key(0)))
        return nnx.split(abstract, nnx.Param, nnx.RngState, ...)

    def init(self, rngs, x, *, train: bool = False) -> dict[str, Any]:
        """Builds the module and returns {"params": ..., ["state": ...]} as nested dicts.

        Args:
          rngs: a PRNG key, or {"params": key, ...} as for Linen.
          x: an example input (unused apart from matching Linen's signature).
          train: unused (NNX modules need no input to initialise).
        """
        del x, train
        key = rngs["params"] if isinstance(rngs, dict) else rngs
        module = self._build(key)
        _, params, _, rest = nnx.split(module, nnx.Param, nnx.RngState, ...)
        variables = {"params": nnx.to_pure_dict(params)}
        if jax.tree.leaves(rest):
            variables["state"] = nnx.to_pure_dict(rest)
        return variables

    def apply(self, variables, x, *, train: bool, rngs=None, mutable=False):
        """Runs the module on `x`; Linen's `apply` contract.

        Args:
          variables: {"params": ..., ["state": ...]} from `init` (or trained).
          x: the input batch.
          train: train mode (dropout on, batch statistics used and updated) or eval mode.
          rngs: {"dropout": key} in training; reseeds the module's "dropout" stream.
          mutable: collections to return updated (the engine passes ["state"] in training).
        Returns:
          outputs, or (outputs, {"state": ...}) when `mutable` is non-empty.
        """
        graphdef, params, rng_state, rest = self._split_abstract()
        nnx.replace_by_pure_dict(params, variables["params"])
        if "state" in variables:
            nnx.replace_by_pure_dict(rest, variables["state"])
        rng_state = jax.tree.map(_concrete, rng_state)
        module = nnx.merge(graphdef, params, rng_state, rest)
        if self.bn_axis_name is not None:
            for _, node in nnx.iter_graph(module):
                if isinstance(node, nnx.BatchNorm):
                    node.axis_name = self.bn_axis_name
        key = (rngs or {}).get("dropout") if isinstance(rngs, dict) else rngs
        if key is not None:
            # A module built with `nnx.Rngs(0)` draws dropout masks from its "default" stream,
            # so every stream it holds is reseeded from the step's key.
            tags = {n.tag for _, n in nnx.iter_graph(module) if isinstance(n, nnx.RngStream)}
            nnx.reseed(module, **{tag: key for tag in tags})
        module.train() if train else module.eval()
        outputs = module(x)
        if not mutable:
            return outputs
        _, _, _, rest = nnx.split(module, nnx.Param, nnx.RngState, ...)
        return outputs, {"state": nnx.to_pure_dict(rest)}
