"""fit(loss_fn=..., metrics=...): your own loss and metrics, checked before compiling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_digits_config

import dlkit


def my_cross_entropy(logits, labels):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]  # (B,)


def top2(logits, labels):
    best2 = jnp.argsort(logits, axis=-1)[:, -2:]
    return (best2 == labels[:, None]).any(axis=-1).astype(jnp.float32)  # (B,)


def test_own_loss_gives_the_built_in_numbers_and_own_metrics_are_logged():
    built_in = dlkit.fit(tiny_digits_config())
    own = dlkit.fit(tiny_digits_config(), loss_fn=my_cross_entropy, metrics={"top2": top2})
    np.testing.assert_allclose(
        own.history.series("train/loss")[1], built_in.history.series("train/loss")[1], rtol=1e-5
    )
    assert own.history.last("eval/loss") == pytest.approx(built_in.history.last("eval/loss"))
    top2_acc, acc = own.history.last("eval/top2"), built_in.history.last("eval/accuracy")
    assert top2_acc >= acc and top2_acc > 0.2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"loss_fn": lambda o, y: my_cross_entropy(o, y).mean()}, r"loss_fn: expected one value"),
        ({"loss_fn": lambda o, y: o @ y}, r"loss_fn: calling loss_fn\(outputs \(2, 10\)"),
        ({"metrics": {"bad": lambda o, y: o}}, r"bad: expected one value per example"),
        ({"loss_fn": "mse"}, r"loss_fn: expected a function"),
        # A metric under a name dlkit logs itself would replace dlkit's number silently.
        (
            {"metrics": {"loss": lambda o, y: o[:, 0]}},
            r"metrics: expected a name other than loss, grad_norm, learning_rate, "
            r"skipped_steps \(dlkit logs train/loss itself\), got 'loss'",
        ),
        ({"metrics": {"grad_norm": lambda o, y: o[:, 0]}}, r"got 'grad_norm'"),
        (
            {"metrics": {"accuracy": lambda o, y: o[:, 0]}},
            r"metrics: expected a name other than those the loss logs itself \(accuracy\), "
            r"got 'accuracy'",
        ),
        ({"metrics": {3: lambda o, y: o[:, 0]}}, r"metrics: expected names that are non-empty"),
    ],
)
def test_bad_loss_is_refused_before_compiling(kwargs, match):
    strategy = dlkit.make_strategy("jit", num_devices=1)
    with pytest.raises(ValueError, match=match):
        dlkit.fit(tiny_digits_config(), strategy=strategy, **kwargs)
    assert dict(strategy.trace_counts) == {}


def test_an_experiment_file_brings_its_own_loss_and_metrics(tmp_path, capsys):
    import json
    import textwrap

    from dlkit import cli

    path = tmp_path / "my_exp.py"
    path.write_text(
        textwrap.dedent(
            """
            import jax.numpy as jnp
            from conftest import tiny_digits_config

            def config():
                return tiny_digits_config()

            def loss_fn(logits, labels):
                return jnp.sum((logits - jnp.eye(10)[labels]) ** 2, axis=-1)  # (B,)

            metrics = {"max_logit": lambda logits, labels: logits.max(axis=-1)}
            """
        )
    )
    assert cli.main(["train", str(path), "--workdir", str(tmp_path / "run"), "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "eval/max_logit" in printed and "train/max_logit" in printed
    # The file's squared-error loss, not the config's cross-entropy: compare one of each.
    built_in = dlkit.fit(tiny_digits_config())
    assert printed["eval/loss"] != pytest.approx(built_in.history.last("eval/loss"), rel=1e-3)


def doubled_cross_entropy(logits, labels):
    # Twice the config's loss: evaluating with the config's loss would give another number.
    return 2.0 * my_cross_entropy(logits, labels)


@pytest.fixture(scope="module")
def own_loss_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("own_loss") / "run"
    result = dlkit.fit(
        tiny_digits_config(), workdir, loss_fn=doubled_cross_entropy, metrics={"top2": top2}
    )
    return workdir, result


def test_the_workdir_records_the_own_loss_and_metrics(own_loss_run):
    import json

    workdir, _ = own_loss_run
    record = json.loads((workdir / "run.json").read_text())
    assert record["loss"] == {"kind": "python", "function": f"{__name__}.doubled_cross_entropy"}
    assert record["metrics"] == {"top2": f"{__name__}.top2"}


def test_evaluate_needs_the_runs_own_loss_and_then_matches_its_eval_loss(own_loss_run):
    from dlkit import run_record

    workdir, result = own_loss_run
    with pytest.raises(run_record.RecordError, match="loss_fn: .*doubled_cross_entropy"):
        dlkit.evaluate(workdir)
    with pytest.raises(run_record.RecordError, match=r"metrics: .*top2 \(.*\.top2\)"):
        dlkit.evaluate(workdir, loss_fn=doubled_cross_entropy)
    metrics = dlkit.evaluate(workdir, loss_fn=doubled_cross_entropy, metrics={"top2": top2})
    assert metrics["loss"] == pytest.approx(result.history.last("eval/loss"), rel=1e-5)
    assert metrics["top2"] == pytest.approx(result.history.last("eval/top2"), abs=1e-6)


def test_cli_eval_refuses_without_the_own_loss_and_takes_it_by_name(own_loss_run, capsys):
    import json

    from dlkit import cli

    workdir, result = own_loss_run
    assert cli.main(["eval", str(workdir)]) != 0
    assert "dlkit eval: error: loss_fn: " in capsys.readouterr().err
    args = ["--loss", f"{__name__}:doubled_cross_entropy", "--metric", f"top2={__name__}:top2"]
    assert cli.main(["eval", str(workdir), *args]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["loss"] == pytest.approx(result.history.last("eval/loss"), rel=1e-5)
