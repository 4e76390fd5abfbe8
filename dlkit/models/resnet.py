"""Residual networks: CIFAR-style ResNet-20/56 (He et al. 2016, sec. 4.2) and ResNet-18.

    module = ResNet()                                   # ResNet-20, 10 classes, 0.27M params
    module = ResNet(stage_sizes=(9, 9, 9))              # ResNet-56, 0.85M params
    module = ResNet(**RESNET18_IMAGENET)                # ResNet-18, 1000 classes, 11.69M params
    variables = module.init(key, images, train=False)   # {"params", "batch_stats"}
    logits, updates = module.apply(variables, images, train=True, mutable=["batch_stats"])

BatchNorm statistics are taken over the whole global batch under both strategies: under `jit`
the batch is one global array, so `bn_axis_name=None` already reduces over all of it; under
`pmap` each device holds B/n rows and `bn_axis_name="data"` makes BatchNorm average its
statistics across devices. `dlkit.components.build` sets the field for the strategy in use
(`dlkit.components.module_for_strategy`), so configs leave it at None.

`dtype` is the compute dtype (train.precision): the convolutions, BatchNorm outputs and the head
compute in it (BatchNorm takes its statistics in float32), params and running statistics stay
float32, and the logits are returned as float32.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# He-normal initialisation over fan-out, as in the reference implementations.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# Published architectures, as `ResNet` fields.
RESNET20 = {"stage_sizes": (3, 3, 3), "width": 16, "stem": "cifar", "shortcut": "A"}
RESNET56 = {"stage_sizes": (9, 9, 9), "width": 16, "stem": "cifar", "shortcut": "A"}
RESNET18_IMAGENET = {
    "stage_sizes": (2, 2, 2, 2),
    "width": 64,
    "stem": "imagenet",
    "shortcut": "B",
    "num_classes": 1000,
}
# ResNet-18's stages on 32x32 images: a 3x3 stride-1 stem and no max-pool.
RESNET18_CIFAR = {"stage_sizes": (2, 2, 2, 2), "width": 64, "stem": "cifar", "shortcut": "B"}

_STEMS = ("cifar", "imagenet")
_SHORTCUTS = ("A", "B")


def shortcut_a(x: jax.Array, channels: int, stride: int) -> jax.Array:
    """Option A shortcut: strided subsampling and zero-padded channels; no parameters.

    Args:
      x: (B, H, W, C).
      channels: output channels, >= C.
      stride: spatial subsampling factor.
    Returns:
      (B, ceil(H / stride), ceil(W / stride), channels); the new channels are zeros, split
      evenly before and after the old ones.
    """
    x = x[:, ::stride, ::stride, :]  # (B, H', W', C)
    extra = channels - x.shape[-1]
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection: relu(bn(conv(relu(bn(conv x)))) + x).

    Input (B, H, W, C) -> output (B, H / stride, W / stride, channels).
    """

    channels: int
    stride: int = 1
    shortcut: str = "A"  # A | B, see `ResNet.shortcut`
    bn_momentum: float = 0.9
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32  # compute dtype (float32 | bfloat16 | float16); params stay
    #                           float32. Set by the parent ResNet.

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        def norm(name):
            return nn.BatchNorm(
                use_running_average=not train,
                momentum=self.bn_momentum,
                epsilon=1e-5,
                axis_name=self.bn_axis_name,
                dtype=self.dtype,
                name=name,
            )

        def conv(features, kernel, stride, name):
            return nn.Conv(
                features,
                (kernel, kernel),
                strides=(stride, stride),
                padding=((kernel // 2, kernel // 2),) * 2,
                use_bias=False,
                kernel_init=_conv_init,
                dtype=self.dtype,
                name=name,
            )

        residual = x
        y = conv(self.channels, 3, self.stride, "conv1")(x)  # (B, H', W', channels)
        y = nn.relu(norm("bn1")(y))
        y = conv(self.channels, 3, 1, "conv2")(y)
        y = norm("bn2")(y)
        if self.stride != 1 or x.shape[-1] != self.channels:
            if self.shortcut == "A":
                residual = shortcut_a(x, self.channels, self.stride)
            else:
                residual = norm("proj_bn")(conv(self.channels, 1, self.stride, "proj")(x))
        return nn.relu(y + residual)  # (B, H', W', channels)


class ResNet(nn.Module):
    """A stem, stages of `BasicBlock`s (channels doubling, stride 2 from the second stage on),
    global average pooling and a linear head.

    Depth = 2 * sum(stage_sizes) + 2: (3, 3, 3) is ResNet-20, (9, 9, 9) ResNet-56 (6n + 2 with
    n blocks per stage), (2, 2, 2, 2) ResNet-18.

    Input: images (B, H, W, C), channels last, float. Output: logits (B, num_classes), float32.
    Collections: "params" and "batch_stats" (pass `mutable=["batch_stats"]` when training).
    """

    stage_sizes: tuple[int, ...] = (3, 3, 3)  # BasicBlocks per stage; stage i has width * 2**i ch
    width: int = 16  # channels of the first stage: 16 for CIFAR ResNets, 64 for ResNet-18
    stem: str = "cifar"  # cifar: 3x3 conv, stride 1 | imagenet: 7x7 conv stride 2 + 3x3 max-pool
    shortcut: str = "A"  # A: parameter-free (subsample + zero channels) | B: 1x1 conv + BN
    num_classes: int = 10  # size of the output layer
    bn_momentum: float = 0.9  # running statistics decay, in [0, 1)
    bn_axis_name: str | None = None  # set by the engine: "data" under pmap, None under jit
    dtype: Any = jnp.float32  # compute dtype (float32 | bfloat16 | float16); params stay
    #                           float32. Set by train.precision.

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        if x.ndim != 4:
            raise ValueError(f"ResNet input: expected (B, H, W, C), got shape {x.shape}")
        if self.stem not in _STEMS:
            raise ValueError(f"ResNet.stem: expected one of {_STEMS}, got {self.stem!r}")
        if self.shortcut not in _SHORTCUTS:
            raise ValueError(
                f"ResNet.shortcut: expected one of {_SHORTCUTS}, got {self.shortcut!r}"
            )
        x = x.astype(self.dtype)
        if self.stem == "cifar":
            x = nn.Conv(
                self.width,
                (3, 3),
                padding=((1, 1), (1, 1)),
                use_bias=False,
                kernel_init=_conv_init,
                dtype=self.dtype,
                name="stem_conv",
            )(x)  # (B, H, W, width)
        else:
            x = nn.Conv(
                self.width,
                (7, 7),
                strides=(2, 2),
                padding=((3, 3), (3, 3)),
                use_bias=False,
                kernel_init=_conv_init,
                dtype=self.dtype,
                name="stem_conv",
            )(x)  # (B, H/2, W/2, width)
        x = nn.BatchNorm(
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=1e-5,
            axis_name=self.bn_axis_name,
            dtype=self.dtype,
            name="stem_bn",
        )(x)
        x = nn.relu(x)
        if self.stem == "imagenet":
            x = nn.max_pool(
                x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1))
            )  # (B, H/4, W/4, width)
        for i, blocks in enumerate(self.stage_sizes):
            for j in range(blocks):
                x = BasicBlock(
                    self.width * 2**i,
                    stride=2 if i > 0 and j == 0 else 1,
                    shortcut=self.shortcut,
                    bn_momentum=self.bn_momentum,
                    bn_axis_name=self.bn_axis_name,
                    dtype=self.dtype,
                    name=f"stage{i + 1}_block{j + 1}",
                )(x, train=train)  # (B, H_i, W_i, width * 2**i)
        x = jnp.mean(x, axis=(1, 2))  # (B, channels)
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)  # (B, num_classes)
        return logits.astype(jnp.float32)
