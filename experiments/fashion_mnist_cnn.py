"""Small CNN on Fashion-MNIST: >= 91% on the official 10k test set.

Command:   dlkit train fashion_mnist_cnn
Hardware:  2 CPU cores, no accelerator.
Runtime:   RUNTIME_PLACEHOLDER
Result:    RESULT_PLACEHOLDER
Data:      the standard IDX files (Debian: `apt-get install dataset-fashion-mnist`, installed under
           /usr/share/datasets/fashion-mnist; or set DLKIT_DATA_DIR / --set data.data_dir=DIR).
           60,000 train / 10,000 official test images, 28x28 grey.
"""

import dlkit


def config() -> dlkit.Config:
    cfg = dlkit.Config(name="fashion_mnist_cnn")
    cfg.data.name = "fashion_mnist"
    cfg.model.name = "cnn"
    cfg.model.options = {"features": (32, 64), "dense_size": 128, "dropout_rate": 0.3}
    cfg.optim.name = "adamw"
    cfg.optim.learning_rate = 2e-3
    cfg.optim.schedule = "warmup_cosine"
    cfg.optim.warmup_steps = 200
    cfg.optim.weight_decay = 1e-4
    cfg.train.steps = 3750  # 8 epochs of 60,000 at batch 128
    cfg.train.batch_size = 128
    cfg.train.eval_batch_size = 500
    cfg.train.log_every = 250
    cfg.train.eval_every = 1250
    cfg.checkpoint.every_steps = 1250
    return cfg
