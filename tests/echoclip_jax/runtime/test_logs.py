"""A command prints the project's own lines; libraries' INFO only when --verbosity asks for it."""

import subprocess
import sys

SCRIPT = """
import logging, sys
from absl import logging as absl_logging
from echoclip_jax.runtime import cli

FLAGS = cli.flag_values()

def body(flags):
    absl_logging.info("absl info chatter")
    logging.getLogger("orbax.checkpoint").info("orbax info chatter")
    logging.getLogger("grain").warning("grain warns")
    logging.getLogger("echoclip_jax.train").info("step 1/3 loss 1.0")

sys.exit(cli.run(body, FLAGS, name="train", doc="a command"))
"""


def _run(*args):
    r = subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stderr


def test_libraries_at_warning_by_default():
    err = _run()
    assert "step 1/3 loss 1.0" in err and "echoclip_jax.train: step 1/3" in err  # the project's own line
    assert "grain warns" in err  # warnings always reach the user
    assert "chatter" not in err


def test_verbosity_shows_library_info():
    err = _run("--verbosity=0")
    assert "absl info chatter" in err and "orbax info chatter" in err and "step 1/3 loss 1.0" in err
