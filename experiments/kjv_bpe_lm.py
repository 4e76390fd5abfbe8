"""BPE Transformer LM on the King James Bible, fortunes and licences, read through Grain.

Command:   python -m dlkit.data.tokenize_corpus ~/.cache/dlkit/kjv_bpe     # once
           dlkit train kjv_bpe_lm            # data.path = $DLKIT_DATA_DIR or ~/.cache/dlkit,
                                             # /kjv_bpe; another corpus: --set data.path=DIR
           dlkit sample WORKDIR --prompt "And God said" --length 64     # 64 BPE tokens
Hardware:  2 CPU cores (sized for them: the char-level kjv_char_lm's Transformer with a 4096-token
           tied embedding, 1.32M params).
Runtime:   33 min 39 s wall for the 3000 steps (1.5-1.7 steps/s), evals and checkpoints
           included, on 2 CPU cores with nothing else running.
Result:    held-out loss 4.0591 nats per BPE token, next-token accuracy 28.33% at step 3000
           (chance: ln 4096 = 8.32); train loss 3.40. Seed 0. Losses are nats per BPE token,
           not comparable with kjv_char_lm's nats per character (docs/data.md, "Measured").
Data:      `python -m dlkit.data.tokenize_corpus DIR` (dlkit.data.tokenize_corpus): the KJV
           (Debian `bible-kjv` + `bible-kjv-text`), the fortune cookies (`fortunes`) and the
           licence texts of /usr/share/common-licenses (`base-files`), 58 files, 7.3 MB; a
           byte-level BPE tokenizer (HF `tokenizers`, `pip install 'dlkit[text]'`) trained on
           the train parts, vocabulary 4096; each file's last 5% held out: 2,081,694 train /
           112,227 test tokens (uint16 memory-mapped .npy files), read by Grain's pipeline
           (data.pipeline=grain, one worker process).
"""

import dlkit
from dlkit.data import text


def config() -> dlkit.Config:
    # kjv_char_lm's model, optimizer and schedule, so the two differ only in the tokens.
    cfg = dlkit.load_config("kjv_char_lm")
    cfg.name = "kjv_bpe_lm"
    cfg.data.name = "bpe_corpus"
    cfg.data.path = str(text.cache_dir() / "kjv_bpe")  # python -m dlkit.data.tokenize_corpus
    cfg.data.seq_len = 128  # BPE tokens per example (about 3.7 characters each on the KJV)
    cfg.data.pipeline = "grain"
    cfg.data.grain_workers = 1  # reads and batches beside the step on the second core
    # model.options["vocab_size"] stays 0: it comes from the corpus's manifest.json.
    return cfg
