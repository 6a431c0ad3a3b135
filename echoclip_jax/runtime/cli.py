"""The convention every `python -m echoclip_jax.<command>` follows.

A command declares its flags at module level on its own `FlagValues` (`flag_values()`), so several commands
import into one process without clashing and `main(argv)` works after an import. Required flags are
declared one way: `flags.mark_flags_as_required([...], flag_values=FLAGS)`. `main(argv=None) -> int` hands
its body to `run`, which parses the flags and returns the exit status:

  0  done; `--help` prints the command's description and flags and exits 0 too
  1  failed: unreadable or wrong input, a failed run; the message names the file or flag and the problem
  2  usage: an unknown, missing or malformed flag, flags that do not go together, or a config value that
     fails validation

Every command has `--verbosity` (absl's levels: 0 the libraries' INFO lines too, 1 DEBUG); without it the
project's own lines are at INFO and the libraries' at WARNING (`echoclip_jax.runtime.logs`).
"""

from __future__ import annotations

import sys
from typing import Callable

from absl import flags

from echoclip_jax.runtime import logs

OK, FAILED, USAGE = 0, 1, 2
HELP = ("--help", "-h", "-?", "--helpshort", "--helpfull")
# what a command reports as a failure of its input or run (exit 1) rather than as a crash with a traceback
FAILURES = (ValueError, OSError, ImportError)


class UsageError(Exception):
    """Flags that cannot run: the command exits 2 with this message."""


def flag_values() -> flags.FlagValues:
    """A command's own flags, with the `--verbosity` every command has."""
    fv = flags.FlagValues()
    flags.DEFINE_integer(
        "verbosity",
        None,
        "libraries' log level (absl's: 0 = their INFO lines too, 1 = DEBUG); "
        "default: the project's lines only, libraries' warnings",
        flag_values=fv,
    )
    return fv


def help_text(fv: flags.FlagValues, doc: str, prog: str) -> str:
    return f"usage: {prog} [flags]\n\n{doc.strip()}\n\nflags:\n{fv.get_help(include_special_flags=False)}"


def parse(fv: flags.FlagValues, argv: list[str]) -> list[str]:
    """Parses `argv` (argv[0] the program) into `fv` from its defaults, as often as called (the config
    file's `--config.*` override flags of an earlier parse are dropped first); raises flags.Error."""
    for name in [n for n in fv if "." in n]:
        delattr(fv, name)
    fv.unparse_flags()
    saved = sys.argv
    sys.argv = argv  # ml_collections' config flag reads its --config.* overrides from sys.argv as it parses
    try:
        return fv(argv)
    finally:
        sys.argv = saved


def say(name: str, message: str) -> None:
    """The one way a command reports an error: `echoclip_jax.<name>: error: <message>` on stderr."""
    print(f"echoclip_jax.{name}: error: {message}", file=sys.stderr, flush=True)


def run(
    body: Callable[[flags.FlagValues], int | None],
    fv: flags.FlagValues,
    argv: list[str] | None = None,
    *,
    name: str,
    doc: str,
    failures: tuple = FAILURES,
    positional: bool = False,
) -> int:
    """Parses `argv` (default sys.argv) into `fv`, sets up the logs, runs `body(fv)` (`body(fv, args)` with
    the positional arguments when the command takes them) and returns the exit status (see the module
    docstring): body's own, or 0 when it returns None."""
    argv = list(sys.argv if argv is None else argv)
    prog = f"python -m echoclip_jax.{name}"
    if any(a in HELP for a in argv[1:]):
        print(help_text(fv, doc, prog))
        return OK
    try:
        extra = parse(fv, argv)
        if len(extra) > 1 and not positional:
            raise UsageError(f"unexpected argument(s) {extra[1:]}: every input is a --flag")
    except (flags.Error, UsageError) as e:
        say(name, f"{e}\nTry `{prog} --help`.")
        return USAGE
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # libraries that log through absl need its global flags parsed
    logs.setup(fv.verbosity)
    try:
        status = body(fv, extra[1:]) if positional else body(fv)
    except UsageError as e:
        say(name, f"{e}\nTry `{prog} --help`.")
        return USAGE
    except failures as e:
        say(name, str(e))
        return FAILED
    return OK if status is None else int(status)
