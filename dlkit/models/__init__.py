"""Model zoo: Flax Linen modules used through pure `init` / `apply`.

Every module here is called as `module.apply(variables, x, train=bool, rngs={"dropout": key})`
and returns outputs of shape (B, num_outputs) (a language model: logits (B, T, V)). Its
hyperparameters are its dataclass fields; the registry below maps the names used in configs
(`model.name`) to the classes.

    import dlkit
    module = dlkit.models.build("mlp", hidden_sizes=(128,), num_classes=10)
    variables = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
"""

from typing import Any

import flax.linen as nn

from dlkit import errors
from dlkit.models.audio import AudioClassifier
from dlkit.models.cnn import CNN
from dlkit.models.mlp import MLP
from dlkit.models.resnet import ResNet
from dlkit.models.transformer import TransformerLM
from dlkit.models.vit import ViT

REGISTRY: dict[str, type[nn.Module]] = {
    "mlp": MLP,
    "cnn": CNN,
    "resnet": ResNet,
    "transformer_lm": TransformerLM,
    "vit": ViT,
    "audio_cnn": AudioClassifier,
}

__all__ = [
    "CNN",
    "MLP",
    "REGISTRY",
    "ResNet",
    "TransformerLM",
    "build",
    "from_config",
    "get_model_class",
    "register",
]


def register(name: str, module_cls: type[nn.Module]) -> None:
    """Makes `module_cls` available as `model.name=<name>` in configs."""
    REGISTRY[name] = module_cls


def get_model_class(name: str) -> type[nn.Module]:
    """The module class registered under `name`."""
    if name not in REGISTRY:
        raise errors.ConfigError(f"model.name: expected one of {sorted(REGISTRY)}, got {name!r}")
    return REGISTRY[name]


def build(name: str, **options: Any) -> nn.Module:
    """Instantiates the module `name` with `options` as its fields."""
    return get_model_class(name)(**options)


def from_config(section) -> nn.Module:
    """The module a config's `model` section (`cfg.model`) names, with its options as fields.

    Read by attribute, so any object with `name` and `options` works (this package does not
    import the config).

    Args:
      section: the `model` section: `name` (a registered model) and `options` (its fields).
    Returns:
      The Flax module, `build(section.name, **section.options)`.
    """
    return build(section.name, **section.options)
