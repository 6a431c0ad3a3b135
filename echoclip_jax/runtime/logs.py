"""What a command prints: the project's own lines, and libraries' only when they warn.

Libraries log a great deal at INFO (Orbax alone hundreds of lines per training run). `setup()` keeps the
project's loggers (`echoclip_jax.*`) at INFO on stderr and puts absl, Orbax, grain and JAX at WARNING, unless
the command was given `--verbosity` (absl's levels: 0 the libraries' INFO too, 1 DEBUG).
"""

from __future__ import annotations

import logging
import sys

from absl import logging as absl_logging

FORMAT = "%(asctime)s %(name)s: %(message)s"


def setup(verbosity: int | None = None) -> None:
    """Called once by every command (`echoclip_jax.runtime.cli.run`). `verbosity`: absl's level for the
    libraries (None: WARNING)."""
    if verbosity is None:
        absl_logging.set_verbosity(absl_logging.WARNING)
        logging.getLogger().setLevel(logging.WARNING)
    else:
        absl_logging.set_verbosity(verbosity)
        logging.getLogger().setLevel(logging.DEBUG if verbosity >= 1 else logging.INFO)
    own = logging.getLogger("echoclip_jax")
    own.setLevel(logging.DEBUG if verbosity is not None and verbosity >= 1 else logging.INFO)
    if not any(getattr(h, "_echoclip", False) for h in own.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        handler._echoclip = True
        own.addHandler(handler)
    own.propagate = False
