"""Tests for dlkit.config: loading experiments, typed `--set` overrides and JSON round trips."""

import ast
import dataclasses
import json
import pathlib

import pytest

import dlkit
from dlkit import config

DIGITS_MLP = pathlib.Path(__file__).resolve().parent.parent / "experiments" / "digits_mlp.py"


def _docstring_first_line(path):
    return ast.get_docstring(ast.parse(path.read_text())).strip().splitlines()[0]


def test_load_digits_mlp_returns_its_values():
    cfg = dlkit.load_config("digits_mlp")
    assert isinstance(cfg, dlkit.Config)
    assert cfg.name == "digits_mlp"
    assert cfg.model.name == "mlp"
    assert cfg.model.options == {"hidden_sizes": (256, 256), "dropout_rate": 0.2, "num_classes": 10}
    assert cfg.optim.name == "adamw"
    assert cfg.optim.learning_rate == 1e-3
    assert cfg.optim.schedule == "warmup_cosine"
    assert cfg.optim.warmup_steps == 100
    assert cfg.train.steps == 2000
    assert cfg.train.batch_size == 128
    assert cfg.checkpoint.every_steps == 500


def test_overrides_are_applied_with_python_types():
    cfg = dlkit.load_config(
        "digits_mlp",
        overrides=[
            "train.steps=7",
            "optim.learning_rate=3e-3",
            "data.shuffle=false",
            "parallel.strategy=pmap",
            "checkpoint.every_steps=5",
            "train.batch_size=64",
            "train.seed=3",
        ],
    )
    checks = [
        (cfg.train.steps, 7, int),
        (cfg.optim.learning_rate, 3e-3, float),
        (cfg.data.shuffle, False, bool),
        (cfg.parallel.strategy, "pmap", str),
        (cfg.checkpoint.every_steps, 5, int),
        (cfg.train.batch_size, 64, int),
        (cfg.train.seed, 3, int),
    ]
    for value, expected, typ in checks:
        assert value == expected
        assert type(value) is typ
    # untouched keys keep the experiment's values.
    assert cfg.optim.warmup_steps == 100


def test_overrides_apply_in_order():
    cfg = dlkit.load_config("digits_mlp", overrides=["train.steps=7", "train.steps=9"])
    assert cfg.train.steps == 9


@pytest.mark.parametrize("text", ["64,32", "[64, 32]", "(64, 32)", " 64, 32 "])
def test_model_tuple_field_parses_to_tuple_of_ints(text):
    cfg = dlkit.load_config("digits_mlp", overrides=[f"model.hidden_sizes={text}"])
    assert cfg.model.options["hidden_sizes"] == (64, 32)
    assert type(cfg.model.options["hidden_sizes"]) is tuple
    assert all(type(v) is int for v in cfg.model.options["hidden_sizes"])


def test_model_float_field_is_float():
    cfg = dlkit.load_config("digits_mlp", overrides=["model.dropout_rate=0.5"])
    assert cfg.model.options["dropout_rate"] == 0.5
    assert type(cfg.model.options["dropout_rate"]) is float
    cfg = dlkit.load_config("digits_mlp", overrides=["model.dropout_rate=0"])
    assert type(cfg.model.options["dropout_rate"]) is float


def test_model_tuple_field_rejects_non_ints():
    with pytest.raises(dlkit.ConfigError, match="model.hidden_sizes"):
        dlkit.load_config("digits_mlp", overrides=["model.hidden_sizes=64,abc"])


def test_switching_model_uses_the_new_modules_fields():
    cfg = dlkit.load_config("digits_mlp", overrides=["model.name=cnn", "model.features=8,16"])
    assert cfg.model.name == "cnn"
    # the MLP's options do not carry over to the CNN.
    assert cfg.model.options == {"features": (8, 16)}
    assert "model.features" in config.valid_keys(cfg)
    assert "model.hidden_sizes" not in config.valid_keys(cfg)
    with pytest.raises(dlkit.ConfigError, match="model.hidden_sizes"):
        dlkit.load_config("digits_mlp", overrides=["model.name=cnn", "model.hidden_sizes=64,32"])


def test_model_keys_come_from_module_fields():
    cfg = dlkit.Config()
    keys = config.valid_keys(cfg)
    for field in ("hidden_sizes", "num_classes", "dropout_rate"):
        assert f"model.{field}" in keys
    assert "model.parent" not in keys
    # a field that only the CNN has is unknown for the MLP.
    with pytest.raises(dlkit.ConfigError, match="model.features"):
        config.set_value(cfg, "model.features", "8")


def test_unknown_model_name_is_an_error():
    with pytest.raises(dlkit.ConfigError, match="nope"):
        dlkit.load_config("digits_mlp", overrides=["model.name=nope"])


def test_unknown_key_lists_valid_keys():
    with pytest.raises(dlkit.ConfigError) as info:
        dlkit.load_config("digits_mlp", overrides=["train.stpes=7"])
    message = str(info.value)
    assert "train.stpes" in message
    for key in ("train.steps", "optim.learning_rate", "data.shuffle", "model.hidden_sizes"):
        assert key in message


@pytest.mark.parametrize("key", ["bogus.steps", "train", "train.steps.x", "model.bogus"])
def test_malformed_keys_are_config_errors(key):
    with pytest.raises(dlkit.ConfigError, match="unknown config key"):
        config.set_value(dlkit.Config(), key, "1")


@pytest.mark.parametrize(
    "override, key, value",
    [
        ("train.steps=abc", "train.steps", "abc"),
        ("train.steps=1.5", "train.steps", "1.5"),
        ("data.shuffle=maybe", "data.shuffle", "maybe"),
        ("optim.learning_rate=fast", "optim.learning_rate", "fast"),
    ],
)
def test_wrong_type_names_key_and_value(override, key, value):
    with pytest.raises(dlkit.ConfigError) as info:
        dlkit.load_config("digits_mlp", overrides=[override])
    assert key in str(info.value)
    assert value in str(info.value)


def test_bool_spellings():
    cfg = dlkit.Config()
    for text, expected in [("true", True), ("False", False), ("1", True), ("off", False)]:
        config.set_value(cfg, "data.shuffle", text)
        assert cfg.data.shuffle is expected


def test_python_values_are_type_checked():
    cfg = dlkit.Config()
    config.set_value(cfg, "train.steps", 12.0)
    assert cfg.train.steps == 12 and type(cfg.train.steps) is int
    config.set_value(cfg, "optim.learning_rate", 1)
    assert type(cfg.optim.learning_rate) is float
    with pytest.raises(dlkit.ConfigError, match="train.steps"):
        config.set_value(cfg, "train.steps", True)
    with pytest.raises(dlkit.ConfigError, match="data.name"):
        config.set_value(cfg, "data.name", 3)


def test_set_without_equals_is_an_error():
    with pytest.raises(dlkit.ConfigError, match="train.steps"):
        dlkit.apply_overrides(dlkit.Config(), ["train.steps"])
    with pytest.raises(dlkit.ConfigError):
        dlkit.load_config("digits_mlp", overrides=["train.steps 7"])


def test_value_may_contain_equals():
    cfg = dlkit.apply_overrides(dlkit.Config(), ["data.data_dir=/tmp/a=b"])
    assert cfg.data.data_dir == "/tmp/a=b"


def test_to_dict_json_round_trip():
    cfg = dlkit.load_config(
        "digits_mlp",
        overrides=["train.steps=7", "model.hidden_sizes=64,32", "data.shuffle=false"],
    )
    d = cfg.to_dict()
    assert d["model"] == {
        "name": "mlp",
        "hidden_sizes": [64, 32],
        "dropout_rate": 0.2,
        "num_classes": 10,
    }
    back = dlkit.Config.from_dict(json.loads(json.dumps(d)))
    assert back.to_dict() == d
    assert back == cfg
    assert back.model.options["hidden_sizes"] == (64, 32)
    assert type(back.model.options["hidden_sizes"]) is tuple
    assert back.train.steps == 7
    assert back.data.shuffle is False


def test_round_trip_of_a_cnn_config():
    cfg = dlkit.Config(name="x")
    dlkit.apply_overrides(cfg, ["model.name=cnn", "model.features=4,8", "model.dense_size=0"])
    back = dlkit.Config.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back.model.name == "cnn"
    assert back.model.options == {"features": (4, 8), "dense_size": 0}
    assert back.to_dict() == cfg.to_dict()


def test_from_dict_type_checks():
    d = dlkit.Config().to_dict()
    d["train"]["steps"] = "many"
    with pytest.raises(dlkit.ConfigError, match="train.steps"):
        dlkit.Config.from_dict(d)
    d = dlkit.Config().to_dict()
    d["train"]["nope"] = 1
    with pytest.raises(dlkit.ConfigError, match="train.nope"):
        dlkit.Config.from_dict(d)


_EXPERIMENT = '''"""A tiny test experiment.

More text that is not the summary.
"""

import dlkit


def config():
    cfg = dlkit.Config()
    cfg.train.steps = 11
    cfg.model.options = {"hidden_sizes": (8,)}
    return cfg
'''


def test_load_experiment_by_path(tmp_path):
    path = tmp_path / "tiny_exp.py"
    path.write_text(_EXPERIMENT)
    cfg = dlkit.load_config(str(path), overrides=["train.batch_size=4"])
    assert cfg.name == "tiny_exp"  # the file's name, since config() left the default
    assert cfg.train.steps == 11
    assert cfg.train.batch_size == 4
    assert cfg.model.options == {"hidden_sizes": (8,)}


def test_list_experiments_includes_digits_mlp_with_its_summary():
    found = dict(dlkit.list_experiments())
    assert found["digits_mlp"] == _docstring_first_line(DIGITS_MLP)
    assert found["digits_mlp"].startswith("MLP on scikit-learn's digits")


def test_experiments_dir_from_environment(tmp_path, monkeypatch):
    (tmp_path / "tiny_exp.py").write_text(_EXPERIMENT)
    (tmp_path / "_private.py").write_text(_EXPERIMENT)
    monkeypatch.setenv("DLKIT_EXPERIMENTS_DIR", str(tmp_path))
    found = dict(dlkit.list_experiments())
    assert found["tiny_exp"] == "A tiny test experiment."
    assert "_private" not in found
    assert "digits_mlp" in found
    assert dlkit.load_config("tiny_exp").train.steps == 11


def test_file_without_config_function_is_an_error(tmp_path):
    path = tmp_path / "no_config.py"
    path.write_text('"""Nothing here."""\nX = 1\n')
    with pytest.raises(dlkit.ConfigError, match=r"config\(\)"):
        dlkit.load_config(str(path))


def test_config_returning_wrong_type_is_an_error(tmp_path):
    path = tmp_path / "bad_config.py"
    path.write_text("def config():\n    return {'train': {'steps': 1}}\n")
    with pytest.raises(dlkit.ConfigError, match="dlkit.Config"):
        dlkit.load_config(str(path))


def test_missing_py_file_is_an_error(tmp_path):
    with pytest.raises(dlkit.ConfigError, match="no such file"):
        dlkit.load_config(str(tmp_path / "absent.py"))


def test_missing_name_lists_known_experiments():
    with pytest.raises(dlkit.ConfigError) as info:
        dlkit.load_config("no_such_experiment")
    assert "no_such_experiment" in str(info.value)
    assert "digits_mlp" in str(info.value)


# --------------------------------------------------------------------------------------------
# Config.validate: the checks that need neither the data nor the devices.


def _with(**values):
    """A default Config with `values` ({"train.steps": 0, ...}) set as they are, unconverted,
    the way an experiment's config() or a notebook sets them."""
    cfg = dlkit.Config()
    for key, value in values.items():
        section, field = key.split(".")
        setattr(getattr(cfg, section), field, value)
    return cfg


def test_defaults_and_every_experiment_validate():
    dlkit.Config().validate()
    for name, _ in dlkit.list_experiments():
        dlkit.load_config(name).validate()


@pytest.mark.parametrize(
    "values,message",
    [
        ({"train.steps": 0}, r"train.steps: expected a positive int, got 0"),
        ({"train.batch_size": -8}, r"train.batch_size: expected a positive int, got -8"),
        (
            {"data.audit_max_examples": 0},
            r"data.audit_max_examples: expected a positive int, got 0",
        ),
        ({"train.log_every": -1}, r"train.log_every: expected an int >= 0, got -1"),
        ({"train.eval_every": -1}, r"train.eval_every: expected an int >= 0, got -1"),
        ({"train.eval_batch_size": -2}, r"train.eval_batch_size: expected an int >= 0, got -2"),
        ({"checkpoint.every_steps": -1}, r"checkpoint.every_steps: expected an int >= 0, got -1"),
        (
            {"checkpoint.every_seconds": -60},
            r"checkpoint.every_seconds: expected a float >= 0 \(0 = off\), got -60",
        ),
        (
            {"checkpoint.every_seconds": 600, "train.log_every": 0},
            r"checkpoint.every_seconds: expected 0 when train.log_every=0 .*, got 600",
        ),
        ({"train.overfit_batches": -1}, r"train.overfit_batches: expected an int >= 0, got -1"),
        ({"data.prefetch": -2}, r"data.prefetch: expected an int >= 0, or -1 \(auto\), got -2"),
        ({"train.nan_policy": "ignore"}, r"train.nan_policy: expected one of raise \| skip, got"),
        ({"checkpoint.best_mode": "up"}, r"checkpoint.best_mode: expected one of min \| max"),
        ({"data.last_batch": "keep"}, r"data.last_batch: expected one of drop \| pad, got 'keep'"),
        ({"data.validate": "yes"}, r"data.validate: expected one of error \| warn \| off"),
        ({"data.audit": "strict"}, r"data.audit: expected one of warn \| fail \| off"),
        (
            {"train.max_consecutive_nonfinite": 0},
            r"train.max_consecutive_nonfinite: expected an int >= 1, got 0",
        ),
        (
            {"train.loss_spike_factor": 0.5},
            r"train.loss_spike_factor: expected 0 \(off\) or a float > 1, got 0.5",
        ),
        ({"train.grad_accum_steps": 0}, r"train.grad_accum_steps: expected an int >= 1, got 0"),
        ({"train.ema_decay": 1.0}, r"train.ema_decay: expected a float in \[0, 1\).*got 1.0"),
        (
            {"data.validation_examples": -1},
            r"data.validation_examples: expected an int >= 0 \(0 = none\), got -1",
        ),
        (
            {"data.train_examples": -1},
            r"data.train_examples: expected an int >= 0 \(0 = all\), got -1",
        ),
        ({"checkpoint.max_to_keep": 0}, r"checkpoint.max_to_keep: expected an int >= 1, got 0"),
        (
            {"optim.name": "adamax"},
            r"optim.name: expected one of \['sgd', 'momentum', 'adam', 'adamw'\], got 'adamax'",
        ),
        ({"optim.schedule": "step"}, r"optim.schedule: expected one of .*got 'step'"),
        ({"optim.learning_rate": 0.0}, r"optim.learning_rate: expected a positive float, got 0"),
        ({"optim.weight_decay": -0.1}, r"optim.weight_decay: expected a float >= 0, got -0.1"),
        ({"optim.grad_clip_norm": -1.0}, r"optim.grad_clip_norm: expected a float >= 0"),
        (
            {"optim.warmup_steps": 50, "train.steps": 12},
            r"optim.warmup_steps: expected an int in \[0, train.steps=12\], got 50",
        ),
        ({"loss.name": "hinge"}, r"loss.name: expected one of \[.*\], got 'hinge'"),
        (
            {"loss.label_smoothing": 1.5},
            r"loss.label_smoothing: expected a float in \[0, 1\), got 1.5",
        ),
        ({"model.name": "nope"}, r"model.name: expected one of \[.*'mlp'.*\], got 'nope'"),
        # Types: a config built in Python is not converted by set_value.
        ({"train.steps": "5"}, r"train.steps: expected an int, got '5'"),
        ({"train.steps": True}, r"train.steps: expected an int, got True"),
        ({"optim.learning_rate": "fast"}, r"optim.learning_rate: expected a float, got 'fast'"),
        ({"data.shuffle": 1}, r"data.shuffle: expected a bool \(true/false\), got 1"),
        ({"parallel.strategy": 3}, r"parallel.strategy: expected a string, got 3"),
    ],
)
def test_validate_names_the_key_the_expected_and_the_received(values, message):
    cfg = _with(**values)
    with pytest.raises(dlkit.ConfigError, match=message):
        cfg.validate()


def _float_keys():
    cfg = dlkit.Config()
    return [
        f"{section}.{f.name}"
        for section in ("data", "loss", "optim", "train", "parallel", "checkpoint")
        for f in dataclasses.fields(getattr(cfg, section))
        if f.type in (float, "float")
    ]


@pytest.mark.parametrize("key", _float_keys())
@pytest.mark.parametrize("text", ["nan", "inf", "-inf"])
def test_non_finite_floats_are_refused(key, text):
    cfg = dlkit.apply_overrides(dlkit.Config(), [f"{key}={text}"])  # accepted: a float
    with pytest.raises(dlkit.ConfigError, match=rf"{key}: expected a finite float, got {text}"):
        cfg.validate()


def test_non_finite_learning_rate_from_the_command_line_is_refused_by_validate():
    cfg = dlkit.load_config("digits_mlp", overrides=["optim.learning_rate=nan"])
    assert cfg.optim.learning_rate != cfg.optim.learning_rate  # loading does not validate
    with pytest.raises(dlkit.ConfigError, match=r"optim.learning_rate: .*finite.*got nan"):
        cfg.validate()


def test_non_finite_and_unknown_model_options_are_refused():
    cfg = dlkit.load_config("digits_mlp", overrides=["model.dropout_rate=inf"])
    with pytest.raises(dlkit.ConfigError, match=r"model.dropout_rate: .*finite.*got inf"):
        cfg.validate()
    cfg = dlkit.Config()
    cfg.model.options = {"hidden_sizez": (8,)}
    with pytest.raises(dlkit.ConfigError, match=r"model.hidden_sizez: expected one of .*mlp"):
        cfg.validate()
    cfg.model.options = {"hidden_sizes": ("8",)}
    with pytest.raises(
        dlkit.ConfigError, match=r"model.hidden_sizes: expected tuple.*got \('8',\)"
    ):
        cfg.validate()


def test_load_config_leaves_value_checks_to_validate():
    cfg = dlkit.load_config("digits_mlp", overrides=["train.steps=0"])
    assert cfg.train.steps == 0
    with pytest.raises(dlkit.ConfigError, match=r"train.steps: expected a positive int, got 0"):
        cfg.validate()


@pytest.mark.parametrize(
    "key,value",
    [
        ("train.log_every", 3),
        ("train.eval_every", 5),
        ("checkpoint.every_steps", 9),
        ("train.steps", 13),
    ],
)
def test_cadences_must_be_multiples_of_steps_per_dispatch(key, value):
    cfg = _with(
        **{
            "train.steps_per_dispatch": 2,
            "train.steps": 12,
            "train.log_every": 2,
            "train.eval_every": 4,
            "checkpoint.every_steps": 6,
            key: value,
        }
    )
    with pytest.raises(
        dlkit.ConfigError, match=rf"{key}: expected a multiple of .*=2.*got {value}"
    ):
        cfg.validate()
    setattr(
        getattr(cfg, key.split(".")[0]), key.split(".")[1], 2 * 7 if key == "train.steps" else 2
    )
    cfg.validate()


@pytest.mark.parametrize(
    "values,message",
    [
        ({"train.steps_per_dispatch": 0}, r"train.steps_per_dispatch: expected an int >= 1, got 0"),
        (
            {"train.scan_unroll": -1},
            r"train.scan_unroll: expected an int >= 0 \(0 = auto\), got -1",
        ),
        (
            {"train.steps_per_dispatch": 2, "train.scan_unroll": 3},
            r"train.scan_unroll: expected a divisor of train.steps_per_dispatch=2, got 3",
        ),
    ],
)
def test_bad_steps_per_dispatch_or_scan_unroll(values, message):
    cfg = _with(
        **{
            "train.steps": 12,
            "train.log_every": 2,
            "train.eval_every": 4,
            "checkpoint.every_steps": 4,
            **values,
        }
    )
    with pytest.raises(dlkit.ConfigError, match=message):
        cfg.validate()
    with pytest.raises(dlkit.ConfigError, match=message):
        config.resolved_scan_unroll(cfg.train)


@pytest.mark.parametrize(
    "k,unroll,expected",
    [
        (1, 0, 1),
        (1, 5, 1),
        (2, 0, 2),
        (7, 0, 7),
        (10, 0, 10),
        (12, 0, 6),
        (50, 0, 10),
        (13, 0, 1),
        (50, 25, 25),
        (4, 1, 1),
    ],
)
def test_resolved_scan_unroll(k, unroll, expected):
    train = config.TrainConfig(steps_per_dispatch=k, scan_unroll=unroll)
    assert config.resolved_scan_unroll(train) == expected


@pytest.mark.parametrize("key", ["train.xla_cpu_vector_width", "data.on_device"])
def test_removed_cpu_knobs_are_unknown_keys(key):
    with pytest.raises(dlkit.ConfigError, match=rf"unknown config key '{key}'"):
        dlkit.apply_overrides(dlkit.Config(), [f"{key}=1"])
    assert "train.xla_cpu_ynn_fusions" in config.valid_keys(dlkit.Config())


@pytest.mark.parametrize(
    "name, setting",
    [
        ("digits", "data.data_dir=/tmp/mnist"),
        ("text", "data.data_dir=/tmp/cache"),
        ("arrays", "data.data_dir=/tmp/cache"),
        ("digits", "data.seq_len=64"),
        ("fashion_mnist", "data.seq_len=64"),
        ("arrays", "data.seq_len=64"),
        ("digits", "data.scale=none"),
        ("kjv", "data.scale=none"),
        ("kjv", "data.path=/tmp/some.txt"),
        ("spoken_digits", "data.path=/tmp/x.npz"),
    ],
)
def test_setting_the_dataset_ignores_is_an_error(name, setting):
    key = setting.split("=")[0]
    with pytest.raises(
        dlkit.ConfigError, match=rf"{key}: read only with .*'{name}', which ignores"
    ):
        dlkit.apply_overrides(dlkit.Config(), [f"data.name={name}", setting]).validate()


@pytest.mark.parametrize(
    "name, setting",
    [
        ("fashion_mnist", "data.data_dir=/tmp/mnist"),
        ("kjv", "data.data_dir=/tmp/cache"),
        ("spoken_digits", "data.data_dir=/tmp/cache"),
        ("text", "data.seq_len=64"),
        ("kjv", "data.seq_len=64"),
        ("arrays", "data.scale=none"),
        ("digits", "data.seq_len=256"),  # the default is not "set"
        ("digits", "data.scale=uint8"),
    ],
)
def test_settings_the_dataset_reads_are_accepted(name, setting):
    cfg = dlkit.apply_overrides(dlkit.Config(), [f"data.name={name}", setting])
    cfg.data.check()
    assert cfg.data.name == name
