"""CIFAR-style ResNet-20 on Fashion-MNIST: target >= 93.5% on the official 10k test set.

Command:   dlkit train fashion_mnist_resnet
Hardware:  meant for one GPU (a ResNet-20 step is ~60x the FLOPs of fashion_mnist_cnn's).
Runtime:   NOT MEASURED on a GPU (no GPU was available to the sessions that built it). On the
           2-core CPU machine see the throughput line below; the full run is hours there.
Result:    NOT MEASURED at full length yet; the target is >= 93.5%. See "Measured so far".
Data:      the standard IDX files (Debian `dataset-fashion-mnist`), 60,000 train / 10,000 test.

Recipe (the CIFAR ResNet recipe of He et al. 2016, scaled to 30 epochs): ResNet-20 (0.27M
params, option-A shortcuts, BatchNorm with global-batch statistics under both strategies),
SGD with Nesterov-free momentum 0.9, peak LR 0.1 with 2 warm-up epochs and cosine decay,
weight decay 5e-4 (not on biases/BatchNorm scales), batch 128, label smoothing 0.1.

Measured so far: see the docstring section filled in by the runs that were done (below).
"""

import dlkit


def config() -> dlkit.Config:
    cfg = dlkit.Config(name="fashion_mnist_resnet")
    cfg.data.name = "fashion_mnist"
    cfg.model.name = "resnet"
    cfg.model.options = {"stage_sizes": (3, 3, 3), "width": 16, "stem": "cifar", "shortcut": "A"}
    cfg.loss.label_smoothing = 0.1
    cfg.optim.name = "momentum"
    cfg.optim.momentum = 0.9
    cfg.optim.learning_rate = 0.1
    cfg.optim.schedule = "warmup_cosine"
    cfg.optim.warmup_steps = 938  # 2 epochs
    cfg.optim.weight_decay = 5e-4
    cfg.train.steps = 14070  # 30 epochs of 60,000 at batch 128
    cfg.train.batch_size = 128
    cfg.train.eval_batch_size = 500
    cfg.train.log_every = 200
    cfg.train.eval_every = 2345  # every 5 epochs
    cfg.checkpoint.every_steps = 2345
    cfg.checkpoint.keep_best = 1
    cfg.checkpoint.best_metric = "eval/accuracy"
    cfg.checkpoint.best_mode = "max"
    return cfg
