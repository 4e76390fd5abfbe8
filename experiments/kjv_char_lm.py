"""Character-level Transformer LM on the King James Bible: target <= 1.45 nats/char held out.

Command:   python experiments/kjv_char_lm.py [--workdir DIR] [--set KEY=VALUE ...]
           (trains like `dlkit train kjv_char_lm`, resuming in DIR, then prints a sample);
           any UTF-8 file instead: --set data.name=text --set data.path=FILE
Hardware:  2 CPU cores (sized for them: 0.80M params, 23.75 GFLOP per step).
Runtime:   19 min 19 s for the 3000 steps (2.5-2.8 steps/s, ~65 GFLOP/s), measured on the
           2-core machine while other jobs ran (load average ~2, this run at nice 5), from the
           workdir's config.json to the final line of output; an idle machine is faster.
Result:    held-out loss 1.3123 nats/char at step 3000 (target <= 1.45; ln 73 = 4.29 is
           chance); 1.5898 / 1.4606 / 1.3978 / 1.3576 / 1.3306 at steps 500-2500, and 1.0884
           on the training text at the end (the held-out tail is other books, Colossians to
           Revelation, so part of the gap is a shift in style, not only overfitting). Seed 0,
           `python experiments/kjv_char_lm.py --workdir /tmp/kjv/run1`. Its sample (prompt: the
           held-out text's first 32 characters; printed by the script's earlier sampler, which
           stopped at max_len = 128 tokens: the script now prints all 200 characters through
           `dlkit.sample`, a sample not re-measured on this run):
             "in every good work, and increasing good.\nJer27:14 Let thy brethren, saying, He
             maketh, and do in their eye; but a disciple for a"
           A GPU-sized run (6 layers, 6 heads, d_model 384, seq_len 256, batch 64, 5000 steps,
           LR 1e-3, warm-up 200: 10.7M params) is NOT measured: no GPU was lent; on the CPU it
           ran ~20 s/step.
Data:      `bible -f Gen1:1-Rev22:21` (Debian `bible-kjv` + `bible-kjv-text`; `.ci/run`
           installs them), dumped once to $DLKIT_DATA_DIR/kjv.txt or ~/.cache/dlkit/kjv.txt:
           31,102 verses, one per line after its reference, 4,404,412 characters, 73 distinct.
           The last 5% (220,220 characters, from Colossians 1:10 to the end) is held out.
"""

import argparse

import numpy as np

import dlkit


def config() -> dlkit.Config:
    cfg = dlkit.Config(name="kjv_char_lm")
    cfg.data.name = "kjv"
    cfg.data.seq_len = 128
    cfg.model.name = "transformer_lm"
    cfg.model.options = {
        "vocab_size": 0,  # the file's characters
        "num_layers": 4,
        "num_heads": 4,
        "d_model": 128,
        "max_len": 128,
        "positions": "rotary",
        "tie_embeddings": True,
        "dropout_rate": 0.1,
    }
    cfg.optim.name = "adamw"
    cfg.optim.learning_rate = 2e-3
    cfg.optim.schedule = "warmup_cosine"
    cfg.optim.warmup_steps = 100
    cfg.optim.end_learning_rate_factor = 0.1
    cfg.optim.b2 = 0.99
    cfg.optim.weight_decay = 0.1
    cfg.optim.grad_clip_norm = 1.0
    cfg.train.steps = 3000
    cfg.train.batch_size = 32
    cfg.train.eval_batch_size = 64
    cfg.train.log_every = 100
    cfg.train.eval_every = 500
    cfg.checkpoint.every_steps = 500
    return cfg


def generate(workdir, prompt: str, num_chars: int, seed: int = 0) -> str:
    """`prompt` and exactly `num_chars` new characters from the run in `workdir`
    (temperature 0.8, top-k 20). `dlkit.sample` goes on past the model's `max_len` by
    keeping the last half of the context, so the asked length is never cut."""
    return prompt + dlkit.sample(workdir, prompt, num_chars, temperature=0.8, top_k=20, seed=seed)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/kjv_char_lm")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--prompt", default=None, help="default: the held-out text's start")
    args = parser.parse_args(argv)
    cfg = dlkit.apply_overrides(config(), args.overrides)
    result = dlkit.fit(cfg, args.workdir)
    print(f"held-out loss: {result.history.last('eval/loss'):.4f} nats/char")
    if args.prompt is None:
        test = dlkit.build(cfg).eval_source
        args.prompt = test.vocab.decode(test.get_batch(np.array([0]))["inputs"][0, :32])
    print("sample:\n" + generate(args.workdir, args.prompt, 200))


if __name__ == "__main__":
    main()
