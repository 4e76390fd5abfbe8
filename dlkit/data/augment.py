"""Image augmentation in JAX, run inside the compiled train step with a key per step.

    aug = dlkit.data.augment.Augment(random_crop_padding=2, horizontal_flip=True, mixup_alpha=0.2)
    batch = aug(key, batch)   # inside train_step; batch["inputs"] (B, H, W[, C])

Each function is pure and takes an explicit key. Per-example draws (crop offsets, flips) use
the key folded with the example's *global* row number, so the same batch gives the same
augmented batch whether it is one global array (`jit`) or split over devices (`pmap`, where
`row_offset` = device index x rows per device). Batch-wide draws (the mixup/cutmix weight and
the cutmix box) use the key alone, so every device draws the same.

Mixup and cutmix make the target a blend of two labels. Rather than soft labels, the batch
gains "mix_labels" (B,) (the partner's label) and "mix_weight" (B,) (lambda, the share of the
example's own label); the step's loss is `lambda * loss(labels) + (1 - lambda) *
loss(mix_labels)`, so integer labels and every loss that takes them still work, and accuracy
stays on the example's own label. Partners are neighbouring rows (0<->1, 2<->3, ...): the
loader shuffles every epoch, so partners change, and pairs never cross a device boundary.

Which suit which data: random crop with padding (a few pixels) suits any image data whose
label does not depend on the exact position (digits, Fashion-MNIST, CIFAR). Horizontal flip
suits data whose classes are mirror-symmetric as sets (Fashion-MNIST clothes, CIFAR, photos),
not text or digits (a flipped 2 or 7 is not a digit). Mixup/cutmix suit classification with
integer labels; they slow the fit of the training set and pay off over longer runs.
"""

import dataclasses

import jax
import jax.numpy as jnp

_MIX_CHOICE = 0x6D6978  # folds of the step key for batch-wide draws ("mix")
_MIX_LAMBDA = 0x6C616D  # "lam"
_CUTMIX_BOX = 0x626F78  # "box"
_CROP, _FLIP = 0, 1  # folds of an example's key


def _example_keys(key: jax.Array, b: int, row_offset) -> jax.Array:
    """(B,) keys, one per example, from its global row number."""
    rows = jnp.arange(b) + row_offset
    return jax.vmap(lambda r: jax.random.fold_in(key, r))(rows)


def _check_images(images: jax.Array, what: str) -> None:
    if images.ndim not in (3, 4):
        raise ValueError(
            f"{what}: expected images of shape (B, H, W) or (B, H, W, C), got shape {images.shape}"
        )


def random_crop(key: jax.Array, images: jax.Array, padding: int, row_offset=0) -> jax.Array:
    """Pads each image with `padding` zeros on every side and cuts a random (H, W) window.

    Args:
      key: a typed PRNG key; example i uses `fold_in(key, row_offset + i)`.
      images: (B, H, W) or (B, H, W, C), any dtype.
      padding: pixels of zero padding per side (>= 0); offsets are uniform in [0, 2*padding].
      row_offset: global row number of images[0] (int or int32 scalar).
    Returns:
      Same shape and dtype as `images`.
    """
    _check_images(images, "random_crop: images")
    if padding == 0:
        return images
    b, h, w = images.shape[:3]
    pad = [(0, 0), (padding, padding), (padding, padding)] + [(0, 0)] * (images.ndim - 3)
    padded = jnp.pad(images, pad)  # (B, H + 2p, W + 2p[, C])
    keys = jax.vmap(lambda k: jax.random.fold_in(k, _CROP))(_example_keys(key, b, row_offset))
    offsets = jax.vmap(lambda k: jax.random.randint(k, (2,), 0, 2 * padding + 1))(keys)  # (B, 2)

    def crop(image, offset):
        start = (offset[0], offset[1]) + (0,) * (image.ndim - 2)
        return jax.lax.dynamic_slice(image, start, (h, w) + image.shape[2:])

    return jax.vmap(crop)(padded, offsets)


def horizontal_flip(key: jax.Array, images: jax.Array, row_offset=0) -> jax.Array:
    """Mirrors each image left-right with probability 1/2 (independently per example).

    Args:
      key, row_offset: as in `random_crop`.
      images: (B, H, W) or (B, H, W, C).
    Returns:
      Same shape and dtype; a flipped image is `image[:, ::-1]` exactly.
    """
    _check_images(images, "horizontal_flip: images")
    b = images.shape[0]
    keys = jax.vmap(lambda k: jax.random.fold_in(k, _FLIP))(_example_keys(key, b, row_offset))
    flip = jax.vmap(jax.random.bernoulli)(keys)  # (B,) bool
    flip = flip.reshape((b,) + (1,) * (images.ndim - 1))
    return jnp.where(flip, jnp.flip(images, axis=2), images)


def partner(x: jax.Array) -> jax.Array:
    """Rows swapped in neighbouring pairs (0<->1, 2<->3, ...); B must be even."""
    b = x.shape[0]
    return x.reshape((b // 2, 2) + x.shape[1:])[:, ::-1].reshape(x.shape)


def mixup(key: jax.Array, images: jax.Array, labels: jax.Array, alpha: float):
    """Blends each image with its partner: x' = lam * x + (1 - lam) * x_partner.

    Args:
      key: a typed PRNG key; lam ~ Beta(alpha, alpha), one per batch.
      images: (B, ...) float, B even.
      labels: (B,) int.
      alpha: > 0.
    Returns:
      (images, mix_labels, mix_weight): images as given (shape, dtype), the partners' labels
      (B,), and lam broadcast to (B,) float32.
    """
    lam = jax.random.beta(jax.random.fold_in(key, _MIX_LAMBDA), alpha, alpha)
    mixed = lam * images + (1.0 - lam) * partner(images)
    weight = jnp.full(labels.shape[:1], lam, jnp.float32)
    return mixed.astype(images.dtype), partner(labels), weight


def cutmix(key: jax.Array, images: jax.Array, labels: jax.Array, alpha: float):
    """Pastes a box of each image's partner into it; lam = the share of pixels left.

    The box (one per batch) has area about (1 - lam0) * H * W with lam0 ~ Beta(alpha, alpha)
    and a uniform centre, clipped at the borders; the returned weight is the exact share of
    the image's own pixels.

    Args, Returns: as in `mixup` (images (B, H, W) or (B, H, W, C)).
    """
    _check_images(images, "cutmix: images")
    h, w = images.shape[1:3]
    lam0 = jax.random.beta(jax.random.fold_in(key, _MIX_LAMBDA), alpha, alpha)
    cy, cx = jax.random.uniform(jax.random.fold_in(key, _CUTMIX_BOX), (2,))
    cut = jnp.sqrt(1.0 - lam0)
    half_h, half_w = cut * h / 2, cut * w / 2
    y0 = jnp.clip(jnp.round(cy * h - half_h), 0, h).astype(jnp.int32)
    y1 = jnp.clip(jnp.round(cy * h + half_h), 0, h).astype(jnp.int32)
    x0 = jnp.clip(jnp.round(cx * w - half_w), 0, w).astype(jnp.int32)
    x1 = jnp.clip(jnp.round(cx * w + half_w), 0, w).astype(jnp.int32)
    ys = jnp.arange(h)[:, None]
    xs = jnp.arange(w)[None, :]
    inside = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)  # (H, W)
    box = inside.reshape((1, h, w) + (1,) * (images.ndim - 3))
    mixed = jnp.where(box, partner(images), images)
    lam = 1.0 - jnp.sum(inside) / (h * w)
    weight = jnp.full(labels.shape[:1], lam, jnp.float32)
    return mixed, partner(labels), weight


@dataclasses.dataclass(frozen=True)
class Augment:
    """The training augmentations, applied in this order: crop, flip, then mixup or cutmix.

    Frozen and hashable: the step closes over it as a static argument. All off by default.
    """

    random_crop_padding: int = 0  # pixels of zero padding per side before a random crop
    horizontal_flip: bool = False  # mirror left-right with probability 1/2
    mixup_alpha: float = 0.0  # Beta(alpha, alpha) mixup weight; 0 = off
    cutmix_alpha: float = 0.0  # Beta(alpha, alpha) cutmix area; 0 = off. With both on,
    #                            each step uses one of the two, chosen with probability 1/2

    def __post_init__(self):
        if self.random_crop_padding < 0:
            raise ValueError(
                f"data.random_crop_padding: expected an int >= 0, got {self.random_crop_padding}"
            )
        for name in ("mixup_alpha", "cutmix_alpha"):
            value = getattr(self, name)
            if value < 0:
                raise ValueError(f"data.{name}: expected a float >= 0 (0 = off), got {value}")

    @property
    def enabled(self) -> bool:
        return bool(self.random_crop_padding or self.horizontal_flip or self.mixes)

    @property
    def mixes(self) -> bool:
        """True when labels are mixed (mixup or cutmix)."""
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def check(self, example_inputs_shape: tuple[int, ...], rows_per_device: int) -> None:
        """Raises ValueError, before compiling, if the data cannot take these augmentations.

        Args:
          example_inputs_shape: one batch's "inputs" shape (B, ...).
          rows_per_device: training rows each device holds per step.
        """
        ndim = len(example_inputs_shape)
        spatial = self.random_crop_padding or self.horizontal_flip or self.cutmix_alpha > 0
        if spatial and ndim not in (3, 4):
            raise ValueError(
                "data.random_crop_padding / horizontal_flip / cutmix_alpha: expected image "
                "inputs of shape (B, H, W) or (B, H, W, C), got inputs of shape "
                f"{tuple(example_inputs_shape)}"
            )
        if self.mixes and rows_per_device % 2:
            raise ValueError(
                "data.mixup_alpha / cutmix_alpha: pairs examples within a device, so expected "
                "an even number of rows per device (train.batch_size / devices), got "
                f"{rows_per_device}"
            )

    def __call__(self, key: jax.Array, batch: dict, row_offset=0) -> dict:
        """Augments a training batch.

        Args:
          key: a typed PRNG key for this step.
          batch: {"inputs": (B, H, W[, C]), "labels": (B,), "mask": (B,)}.
          row_offset: the global row number of the batch's first row (pmap: device index x B).
        Returns:
          The batch with augmented "inputs" (same shape and dtype) and, when mixing,
          "mix_labels" (B,) and "mix_weight" (B,) float32 (see the module docstring).
        """
        batch = dict(batch)
        images = batch["inputs"]
        if self.random_crop_padding:
            images = random_crop(key, images, self.random_crop_padding, row_offset)
        if self.horizontal_flip:
            images = horizontal_flip(key, images, row_offset)
        labels = batch["labels"]
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            m_images, m_labels, m_weight = mixup(key, images, labels, self.mixup_alpha)
            c_images, c_labels, c_weight = cutmix(key, images, labels, self.cutmix_alpha)
            use_mixup = jax.random.bernoulli(jax.random.fold_in(key, _MIX_CHOICE))
            images = jnp.where(use_mixup, m_images, c_images)
            batch["mix_labels"] = jnp.where(use_mixup, m_labels, c_labels)
            batch["mix_weight"] = jnp.where(use_mixup, m_weight, c_weight)
        elif self.mixup_alpha > 0:
            images, batch["mix_labels"], batch["mix_weight"] = mixup(
                key, images, labels, self.mixup_alpha
            )
        elif self.cutmix_alpha > 0:
            images, batch["mix_labels"], batch["mix_weight"] = cutmix(
                key, images, labels, self.cutmix_alpha
            )
        batch["inputs"] = images
        return batch
