"""MLP on scikit-learn's digits (8x8): the default main job, >= 97% test accuracy in seconds.

Command:   dlkit train digits_mlp            (or just `dlkit train`)
Hardware:  2 CPU cores, no accelerator.
Runtime:   7.6-7.8 s wall for 2000 steps on a 2-core Intel Xeon, compilation, the compute
           report's one-off CPU peak measurement and 4 evaluations included (~840 steps/s once
           compiled), with `/usr/bin/time dlkit train digits_mlp --no-progress`.
Result:    98.06% test accuracy (353/360), eval loss 0.065, seed 0; bitwise the same on a rerun.
Data:      sklearn.datasets.load_digits, 1437 train / 360 held-out test (stratified, seed 0).
"""

import dlkit


def config() -> dlkit.Config:
    cfg = dlkit.Config(name="digits_mlp")
    cfg.data.name = "digits"
    cfg.model.name = "mlp"
    cfg.model.options = {"hidden_sizes": (256, 256), "dropout_rate": 0.2, "num_classes": 10}
    cfg.optim.name = "adamw"
    cfg.optim.learning_rate = 1e-3
    cfg.optim.schedule = "warmup_cosine"
    cfg.optim.warmup_steps = 100
    cfg.optim.weight_decay = 1e-4
    cfg.train.steps = 2000
    cfg.train.batch_size = 128
    cfg.train.log_every = 100
    cfg.train.eval_every = 500
    cfg.checkpoint.every_steps = 500
    return cfg
