"""The command convention (echoclip_jax.runtime.cli): every command imports beside the others, `main(argv)` runs
after an import, `--help` exits 0, a wrong command line exits 2 and a failed run 1, each with one line that
names the problem."""

import importlib
import pathlib
import subprocess
import sys

import pytest

from echoclip_jax.runtime import cli

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"
COMMANDS = (
    "aot",
    "convert",
    "demo",
    "embed",
    "evaluate",
    "interpret",
    "probe",
    "probe_labels",
    "report",
    "search",
    "train",
    "train_sentencepiece",
)
TINY = str(CONFIGS / "tiny.py")


def _module(name):
    """The command's module: `echoclip_jax.<name>`, or the demo package's __main__."""
    return importlib.import_module(f"echoclip_jax.{name}" + (".__main__" if name == "demo" else ""))


def _main(name, *args):
    return _module(name).main([name, *args])


def test_every_command_imports_beside_the_others_with_flags_at_module_level():
    modules = [_module(name) for name in COMMANDS]
    for module in modules:
        assert "verbosity" in module.FLAGS and callable(module.main), module.__name__
    assert len({id(m.FLAGS) for m in modules}) == len(modules)  # each its own flags: none clash


@pytest.mark.parametrize("name", COMMANDS)
def test_help_exits_0_with_the_description_and_the_flags(name, capsys):
    assert _main(name, "--help") == 0
    out = capsys.readouterr().out
    doc = _module(name).__doc__
    assert out.startswith(f"usage: python -m echoclip_jax.{name}") and doc.split("\n")[0] in out
    assert "--verbosity" in out


@pytest.mark.parametrize("name", [c for c in COMMANDS if c != "demo"])
def test_a_missing_required_flag_exits_2_naming_it(name, capsys):
    assert _main(name) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"echoclip_jax.{name}: error: ") and "--" in err and "Traceback" not in err


@pytest.mark.parametrize("name", COMMANDS)
def test_an_unknown_flag_exits_2(name, capsys):
    assert _main(name, "--no_such_flag=1") == 2
    assert "no_such_flag" in capsys.readouterr().err


def test_flags_that_do_not_go_together_exit_2_and_a_failed_run_1(tmp_path, capsys):
    out = str(tmp_path / "e")
    assert _main("evaluate", "--config", TINY, "--data_dir", str(tmp_path), "--out", out) == 2
    assert "give --checkpoint KIND:PATH, --workdir W or --glob PATTERN" in capsys.readouterr().err
    assert (
        _main(
            "embed",
            "--config",
            TINY,
            "--checkpoint",
            f"safetensors:{tmp_path}/none.safetensors",
            "--texts",
            str(tmp_path / "t.txt"),
            "--out",
            str(tmp_path / "e.npy"),
        )
        == 1
    )
    assert "none.safetensors" in capsys.readouterr().err
    assert _main("search", "rebuild") == 2
    assert "the first argument is one of build, add, query" in capsys.readouterr().err


def test_a_config_value_that_fails_validation_exits_2(tmp_path, capsys):
    workdir = str(tmp_path / "w")
    assert _main("train", "--config", TINY, "--workdir", workdir, "--config.batch_size=12") == 2
    assert "echoclip_jax.train: error: config: batch_size = 12" in capsys.readouterr().err
    assert _main("aot", "--config", TINY, "--topology", "v9-1") == 2
    assert "--topology 'v9-1': unknown" in capsys.readouterr().err


def test_main_parses_afresh_each_call(tmp_path, capsys):
    """A second call starts from the defaults: neither the first call's flags nor its config overrides remain."""
    workdir = str(tmp_path / "w")
    assert _main("train", "--config", TINY, "--workdir", workdir, "--config.batch_size=12") == 2
    capsys.readouterr()
    assert _main("train", "--config", TINY, "--workdir", workdir, "--config.eval_batches=-1") == 2
    err = capsys.readouterr().err
    assert "eval_batches" in err and "batch_size = 12" not in err


def test_the_module_runs_as_a_program():
    r = subprocess.run(
        [sys.executable, "-m", "echoclip_jax.train", "--help"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and "--workdir" in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "echoclip_jax.train", "--workdir", "w"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == cli.USAGE and "echoclip_jax.train: error: " in r.stderr and "--config" in r.stderr


@pytest.mark.parametrize(
    "name, args, named",
    [
        ("train", ["--config", TINY, "--workdir", "s3://b/run"], "--workdir=s3://b/run: the scheme s3://"),
        ("train", ["--config", TINY, "--workdir", "gs://no-such-bucket-x/run"], "bucket gs://no-such-bucket-x does"),
        ("train", ["--config=gs://b/tiny.py", "--workdir", "w"], "--config=gs://b/tiny.py: a config file is Python"),
        (
            "evaluate",
            ["--config", TINY, "--checkpoint", "orbax:http://h/w", "--data_dir", "d", "--out", "o"],
            "http://",
        ),
        ("evaluate", ["--config", TINY, "--workdir", "w", "--data_dir", "d", "--out", "az://c/o"], "--out=az://c/o"),
        ("evaluate", ["--config", TINY, "--glob", "s3://b/w/*", "--data_dir", "d", "--out", "o"], "--glob=s3://b/w/*"),
        ("demo", ["--out", "gs://b/demo"], "--out=gs://b/demo: the demo writes its synthetic cohort"),
    ],
)
def test_a_path_that_cannot_be_used_exits_2_at_start_up_naming_the_flag(name, args, named, gcs_server, capsys):
    """Before anything is compiled or read: a scheme no layer supports, a bucket that does not exist (on a real
    GCS server), a config file given as a URL."""
    assert _main(name, *args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"echoclip_jax.{name}: error: ") and named in err, err


def test_a_training_config_naming_a_missing_bucket_exits_2(gcs_server, tmp_path, capsys):
    args = ["--config", TINY, "--workdir", str(tmp_path / "w"), "--config.data_dir=gs://no-such-bucket-y/rec"]
    assert _main("train", *args) == 2
    assert (
        "data_dir = 'gs://no-such-bucket-y/rec': bucket gs://no-such-bucket-y does not exist" in capsys.readouterr().err
    )
