"""`dlkit sample` / `dlkit.sample`: exactly N new characters from a character LM's workdir,
also past the model's max_len."""

import pytest

import dlkit
from dlkit import cli


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm")
    text_file = tmp / "t.txt"
    text_file.write_text("the cat sat on the mat. " * 200)
    cfg = dlkit.load_config(
        "kjv_char_lm",
        [
            "data.name=text",
            f"data.path={text_file}",
            "model.num_layers=1",
            "model.num_heads=2",
            "model.d_model=32",
            "model.max_len=32",
            "model.dropout_rate=0.0",
            "data.seq_len=32",
            "train.batch_size=16",
            "train.eval_batch_size=16",
            "train.steps=60",
            "train.log_every=20",
            "train.eval_every=0",
            "train.progress=false",
            "optim.warmup_steps=5",
            "optim.learning_rate=3e-3",
            "parallel.num_devices=1",
        ],
    )
    dlkit.fit(cfg, tmp / "run")
    return tmp / "run"


def test_sample_gives_exactly_n_characters_past_max_len(lm_run):
    text = dlkit.sample(lm_run, "the cat ", 100, temperature=0.0)  # max_len is 32
    assert len(text) == 100
    assert set(text) <= set("the cat sat on mat.")
    assert text == dlkit.sample(lm_run, "the cat ", 100, temperature=0.0)  # greedy: the same


def test_cli_prints_the_same_characters(lm_run, capsys):
    args = ["sample", str(lm_run), "--prompt", "the cat ", "--length", "70"]
    assert cli.main(args + ["--temperature", "0"]) == 0
    printed = capsys.readouterr().out
    assert printed == dlkit.sample(lm_run, "the cat ", 70, temperature=0.0) + "\n"
    assert cli.main(["sample", str(lm_run), "--prompt", "XYZ", "--length", "5"]) == 2
    assert "'X' is not in the vocabulary" in capsys.readouterr().err


def test_sample_refuses_a_classifier_run(tmp_path):
    from conftest import tiny_digits_config

    dlkit.fit(tiny_digits_config(), tmp_path / "digits")
    with pytest.raises(ValueError, match="workdir: expected a language model run on text"):
        dlkit.sample(tmp_path / "digits", "a", 5)
