"""Spoken digits (espeak-ng) with a log-mel CNN: targets >= 98% on unseen voices, >= 95% on
unseen accents.

Command:   dlkit train spoken_digits                      (evaluates test_voices)
           dlkit eval runs/spoken_digits --split test_accents
Hardware:  2 CPU cores, no accelerator.
Runtime:   NOT measured yet.
Result:    NOT measured yet.
Data:      generated once by `espeak-ng` (Debian `espeak-ng`; `.ci/run` installs it) into
           $DLKIT_DATA_DIR or ~/.cache/dlkit (see dlkit.data.speech): 8 English accents x 16
           voice variants x 2 speeds x 2 pitches x 10 digits, de-duplicated; 3 voices and 2
           accents are held out whole.
"""

import dlkit


def config() -> dlkit.Config:
    cfg = dlkit.Config(name="spoken_digits")
    cfg.data.name = "spoken_digits"
    cfg.data.eval_split = "test_voices"
    cfg.model.name = "audio_cnn"
    cfg.model.options = {
        "sample_rate": 22050,
        "n_fft": 512,
        "hop_length": 256,
        "num_mels": 40,
        "features": (16, 32, 64),
        "dropout_rate": 0.2,
    }
    cfg.optim.name = "adamw"
    cfg.optim.learning_rate = 3e-3
    cfg.optim.schedule = "warmup_cosine"
    cfg.optim.warmup_steps = 50
    cfg.optim.weight_decay = 1e-4
    cfg.train.steps = 800
    cfg.train.batch_size = 64
    cfg.train.eval_batch_size = 200
    cfg.train.log_every = 100
    cfg.train.eval_every = 400
    cfg.checkpoint.every_steps = 400
    return cfg
