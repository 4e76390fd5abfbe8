"""checkpoint.init_from from a dlkit step directory, with renames, unused leaves, a corrupt
source, and through `dlkit train` (the Fashion-MNIST fine-tuning is in
tests/test_checkpoint_init_from.py)."""

import numpy as np
import pytest
from conftest import tiny_digits_config

import dlkit
from dlkit import cli
from dlkit.checkpoint import CheckpointError, init_from, store


def _mlp(hidden) -> dlkit.Config:
    cfg = tiny_digits_config()
    cfg.model.options = {"hidden_sizes": hidden, "dropout_rate": 0.0, "num_classes": 10}
    return cfg


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A finished run of a one-hidden-layer MLP (Dense_0: 64->32, Dense_1: 32->10)."""
    workdir = tmp_path_factory.mktemp("pretrained") / "run"
    result = dlkit.fit(_mlp((32,)), workdir)
    return workdir, store.flat_leaves(result.state.params)


def test_a_step_directory_renamed_into_a_deeper_model(pretrained, capsys):
    """Step 12's directory as the source; the saved head (Dense_1) is renamed onto the deeper
    model's head (Dense_2, same shape); the new middle layer (Dense_1) stays fresh."""
    workdir, saved = pretrained
    fresh = dlkit.build(_mlp((32, 32))).init_state()
    state = init_from.apply(
        fresh,
        str(workdir / "checkpoints" / "12"),
        "^params/Dense_1/=params/Dense_2/",
        log=print,
    )
    assert "loaded 4 leaves, newly initialised 2" in capsys.readouterr().out
    got = store.flat_leaves(state.params)
    was = store.flat_leaves(fresh.params)
    for layer, source in (("Dense_0", "Dense_0"), ("Dense_2", "Dense_1")):
        for leaf in ("kernel", "bias"):
            np.testing.assert_array_equal(got[f"{layer}/{leaf}"], saved[f"{source}/{leaf}"])
    for leaf in ("kernel", "bias"):
        np.testing.assert_array_equal(got[f"Dense_1/{leaf}"], was[f"Dense_1/{leaf}"])


def test_saved_leaves_nothing_matches_are_reported_as_unused(pretrained, capsys):
    workdir, _ = pretrained
    fresh = dlkit.build(_mlp((32,))).init_state()
    init_from.apply(fresh, str(workdir), "^params/Dense_1/=params/spare/", log=print)
    out = capsys.readouterr().out
    assert "loaded 2 leaves, newly initialised 2" in out
    assert "unused 2 ['params/spare/bias', 'params/spare/kernel']" in out


def test_a_corrupt_step_directory_is_refused_naming_it(pretrained, tmp_path):
    import shutil

    workdir, _ = pretrained
    step = tmp_path / "12"
    shutil.copytree(workdir / "checkpoints" / "12", step)
    data = max(
        (p for p in step.glob("state/*/c/**/*") if p.is_file()), key=lambda p: p.stat().st_size
    )
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"checkpoint\.init_from: .*12 is corrupt"):
        init_from.apply(dlkit.build(_mlp((32,))).init_state(), str(step), "", log=print)


def test_bad_init_from_map_entries_are_named():
    with pytest.raises(ValueError, match=r"expected REGEX=REPLACEMENT .* got 'no-equals'"):
        init_from.parse_map("no-equals")
    with pytest.raises(ValueError, match=r"bad regex '\('"):
        init_from.parse_map("(=x")


def test_dlkit_train_fine_tunes_from_a_workdir(pretrained, tmp_path, capsys):
    """The command line: `dlkit train --set checkpoint.init_from=WORKDIR` starts at step 0 from
    the pretrained params, and the run trains on from them."""
    workdir, saved = pretrained
    args = ["train", "digits_mlp", "--workdir", str(tmp_path / "tuned"), "--no-progress"]
    sets = [
        "model.hidden_sizes=[32]",
        "model.dropout_rate=0.0",
        "train.steps=1",
        "optim.warmup_steps=0",
        "optim.learning_rate=1e-9",
        "train.eval_every=0",
        "train.plots=false",
        f"checkpoint.init_from={workdir}",
    ]
    assert cli.main(args + [f"--set={s}" for s in sets]) == 0
    out = capsys.readouterr().out
    assert "loaded 4 leaves, newly initialised 0" in out and "resuming" not in out
    state, _ = dlkit.load_checkpoint(tmp_path / "tuned")
    assert int(state.step) == 1
    tuned = store.flat_leaves(state.params)
    for key, value in saved.items():  # one step at lr 1e-9: the pretrained values, nearly
        np.testing.assert_allclose(tuned[key], value, atol=1e-6)
