"""The command line: flags, --help and --helpfull, the bare command (no training here)."""

import os
import subprocess
import sys

import pytest
from absl import flags as absl_flags

from keras_bn.train.cli import flags as train_flags
from keras_bn.train.config import settings as config_lib


def parse(*argv):
    fv = absl_flags.FlagValues()
    train_flags.define_flags(fv)
    fv(["prog", *argv])
    return fv


COMMANDS = {
    # The console script pip installs next to this interpreter.
    "console_script": [os.path.join(os.path.dirname(sys.executable), "keras-bn-train")],
    "python_m": [sys.executable, "-m", "keras_bn.train"],
}


@pytest.mark.parametrize("command", COMMANDS.values(), ids=list(COMMANDS))
def test_help_shows_the_usage_and_every_trainer_flag(command):
    proc = subprocess.run(
        [*command, "--help"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--experiment=figure1" in proc.stdout, proc.stderr[-3000:]  # the usage examples
    for name in parse():
        assert f"--{name}:" in proc.stdout or f"--[no]{name}:" in proc.stdout, name
    headings = [line for line in proc.stdout.splitlines() if line.endswith(" flags:")]
    assert headings == [f"{group.capitalize()} flags:" for group in train_flags.GROUPS]
    assert "steps.; " not in proc.stdout  # the preset descriptions do not run together


def imported_modules(command, *args):
    """Runs `command *args` under `python -X importtime`; returns (process, modules imported)."""
    if command[0] != sys.executable:  # the console script is a Python file
        command = [sys.executable, *command]
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", *command[1:], *args],
        capture_output=True,
        text=True,
        timeout=300,
        # importtime writes to descriptor 2, which the command line would point at /dev/null.
        env={**os.environ, "KERAS_BN_TF_LOGS": "1"},
    )
    modules = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if "|" in line}
    return proc, modules


@pytest.mark.parametrize("command", COMMANDS.values(), ids=list(COMMANDS))
@pytest.mark.parametrize("help_flag", ["--help", "--helpfull"])
def test_help_imports_neither_keras_nor_tensorflow(command, help_flag):
    # Importing TensorFlow takes seconds; the help needs only the flag declarations.
    proc, modules = imported_modules(command, help_flag)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "keras_bn.train.cli.main" in modules and "Training flags" not in proc.stdout
    heavy = sorted(m for m in modules if m.split(".")[0] in ("tensorflow", "keras", "jax", "torch"))
    assert not heavy, heavy[:10]


def test_an_ordinary_import_still_registers_the_layer():
    # Only the trainer's command line defers the library: after a plain `import keras_bn`,
    # load_model finds our class (tests/test_convert_backends.py loads a .keras file so).
    code = (
        "import keras, keras_bn, sys; print(keras.saving.get_registered_object("
        "'keras_bn>BatchNormalization') is keras_bn.layer.BatchNormalization)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "True", proc.stderr[-3000:]


def test_helpfull_lists_the_trainer_groups_and_absl_logging_only():
    proc = subprocess.run(
        [*COMMANDS["python_m"], "--helpfull"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    headings = [line for line in proc.stdout.splitlines() if line.endswith(" flags:")]
    groups = [f"{group.capitalize()} flags:" for group in train_flags.GROUPS]
    assert headings == [*groups, "Logging (absl) flags:"]
    for name in [*parse(), "verbosity", "log_dir"]:
        assert f"--{name}:" in proc.stdout or f"--[no]{name}:" in proc.stdout, name
    for foreign in ("test_tmpdir", "test_srcdir", "delta_threshold", "runtime_oom_exit", "pdb"):
        assert f"--{foreign}:" not in proc.stdout and f"--[no]{foreign}:" not in proc.stdout


@pytest.mark.parametrize("command", COMMANDS.values(), ids=list(COMMANDS))
def test_bare_command_prints_the_usage_and_exits_2(command):
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "--experiment=figure1" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("keras-bn-train: error: no flags")


def test_every_flag_is_in_exactly_one_help_group():
    grouped = [name for names in train_flags.GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(parse()) and len(grouped) == len(set(grouped))


def test_every_flag_has_help_and_config_flags_default_to_none():
    fv = parse()
    for name in config_lib.field_names():
        if name == "preset":
            continue
        assert name in fv, f"no flag for config field {name}"
        assert len(fv[name].help) > 10, name
        assert fv[name].value is None, f"--{name} must default to None (the preset decides)"
    for name in ("experiment", "preset", "cpu_replicas", "model_dir"):
        assert fv[name].help


def test_flags_are_exactly_the_settings_and_follow_their_declarations():
    fv = parse()
    experiment_flags = {
        "experiment",
        "cpu_replicas",
        "eval_crops",
        "ensemble_size",
        "inception_steps",
    }
    assert set(fv) == set(config_lib.field_names()) | experiment_flags
    for name, field in config_lib.settings().items():
        assert field.metadata["help"] in fv[name].help, name
        if field.metadata["choices"] is not None:
            assert fv[name].parser.enum_values == list(field.metadata["choices"]), name
    assert config_lib.RESUMABLE_FIELDS == {
        name for name, field in config_lib.settings().items() if field.metadata["resumable"]
    }
    assert "train_steps" in config_lib.RESUMABLE_FIELDS
    assert "learning_rate" not in config_lib.RESUMABLE_FIELDS


def test_explicit_values_are_the_flags_given_even_when_equal_to_the_default():
    fv = parse("--preset=mnist_bn", "--batch_size=60", "--nobinarize", "--seed=3")
    assert train_flags.explicit_values(fv) == {"batch_size": 60, "binarize": False, "seed": 3}
    assert set(train_flags.present(fv)) == {"batch_size", "binarize", "seed", "preset"}


def test_model_kwargs_are_python_literals_or_strings():
    # DEFINE_list splits on commas, so tuples cannot be passed: a flag error when parsing.
    with pytest.raises(absl_flags.IllegalFlagValueError, match="key=value"):
        parse("--model_kwargs=depth_multiplier=0.25,use_lrn=False,activation=sigmoid,x=(1, 2)")
    fv = parse("--model_kwargs=depth_multiplier=0.25,use_lrn=False,activation=sigmoid")
    assert train_flags.explicit_values(fv)["model_kwargs"] == {
        "depth_multiplier": 0.25,
        "use_lrn": False,
        "activation": "sigmoid",
    }


def test_unknown_preset_and_enum_values_are_flag_errors():
    with pytest.raises(absl_flags.IllegalFlagValueError, match="mnist_bn"):
        parse("--preset=mnist")
    with pytest.raises(absl_flags.IllegalFlagValueError):
        parse("--strategy=horovod")
