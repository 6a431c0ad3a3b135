"""The convention every `python -m echoclip_jax.<command>` follows.

A command declares its flags at module level on its own `FlagValues` (`flag_values()`), so several commands
import into one process without clashing and `main(argv)` works after an import. Required flags are
declared one way: `flags.mark_flags_as_required([...], flag_values=FLAGS)`. `main(argv=None) -> int` hands
its body to `run`, which parses the flags and returns the exit status:

  0  done; `--help` prints the command's description and flags and exits 0 too
  1  failed: unreadable or wrong input, a failed run; the message names the file or flag and the problem
  2  usage: an unknown, missing or malformed flag, flags that do not go together, a config value that
     fails validation, or a path flag whose scheme is not supported or whose bucket does not exist

A command names its path flags (`paths=`): each may be a local path or a gs:// URL, and each is checked
(`echoclip_jax.runtime.storage.check`) before the command's body runs, so nothing is compiled or read for a
run whose output bucket is a typo.

Every command has `--verbosity` (absl's levels: 0 the libraries' INFO lines too, 1 DEBUG); without it the
project's own lines are at INFO and the libraries' at WARNING (`echoclip_jax.runtime.logs`).

On a machine without TPU chips where libtpu is installed (the compile-only TPU topologies of `aot` and the
tests), JAX would still start its TPU backend and libtpu would print errors about TPU_WORKER_HOSTNAMES and
the accelerator type; unless JAX_PLATFORMS is set, a command leaves the TPU backend out (`skip_absent_tpu`).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys
from typing import Callable

from absl import flags

from echoclip_jax.runtime import logs, storage

OK, FAILED, USAGE = 0, 1, 2
HELP = ("--help", "-h", "-?", "--helpshort", "--helpfull")
# what a command reports as a failure of its input or run (exit 1) rather than as a crash with a traceback
FAILURES = (ValueError, OSError, ImportError)


# TPU chips on the PCI bus: Google's vendor id and a TPU device id (v3 .. TPU7x), JAX's own test
# (jax._src.hardware_utils); other Google devices (gVNIC) are not TPUs
GOOGLE_PCI_VENDOR = "0x1ae0"
TPU_PCI_DEVICES = ("0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076")


def tpu_chips_here(pci_devices: str = "/sys/bus/pci/devices") -> bool:
    for vendor in glob.glob(os.path.join(pci_devices, "*", "vendor")):
        try:
            with open(vendor) as v, open(os.path.join(os.path.dirname(vendor), "device")) as d:
                if v.read().strip() == GOOGLE_PCI_VENDOR and d.read().strip() in TPU_PCI_DEVICES:
                    return True
        except OSError:
            continue
    return False


def skip_absent_tpu() -> None:
    """libtpu installed where there is no TPU: JAX's platforms are this machine's others (CUDA when its
    plugin is installed, which JAX skips without a GPU; the CPU), so libtpu is not started and prints
    nothing. JAX_PLATFORMS, when set (even empty: JAX's own choice), is left alone. Compile-only TPU
    topologies (`aot`) load libtpu themselves and are unaffected."""
    if "JAX_PLATFORMS" in os.environ or importlib.util.find_spec("libtpu") is None or tpu_chips_here():
        return
    plugins = importlib.util.find_spec("jax_plugins")  # the namespace JAX's CUDA plugins install into
    cuda = plugins is not None and any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") for v in (12, 13))
    platforms = "cuda,cpu" if cuda else "cpu"
    os.environ["JAX_PLATFORMS"] = platforms  # read by JAX when imported, here and in child processes
    if "jax" in sys.modules:
        sys.modules["jax"].config.update("jax_platforms", platforms)


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


def refuse_remote_config(argv: list[str]) -> None:
    """A config file is Python code, read when the flags are parsed and from local disk only: a URL is refused
    here, before the parser tries to open it."""
    values = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    values += [v for a, v in zip(argv, argv[1:]) if a == "--config"]
    for value in values:
        if storage.is_remote(value):
            raise UsageError(
                f"--config={value}: a config file is Python code, read from local disk: copy it here first "
                f"(`gcloud storage cp {value} .`) and pass the local copy"
            )


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
    paths: tuple[str, ...] = (),
    specs: tuple[str, ...] = (),
) -> int:
    """Parses `argv` (default sys.argv) into `fv`, sets up the logs, runs `body(fv)` (`body(fv, args)` with
    the positional arguments when the command takes them) and returns the exit status (see the module
    docstring): body's own, or 0 when it returns None. `paths` names the flags that are paths and `specs` the
    KIND:PATH flags (weights), whose paths are checked before the body runs."""
    argv = list(sys.argv if argv is None else argv)
    prog = f"python -m echoclip_jax.{name}"
    if any(a in HELP for a in argv[1:]):
        print(help_text(fv, doc, prog))
        return OK
    try:
        refuse_remote_config(argv)
        extra = parse(fv, argv)
        if len(extra) > 1 and not positional:
            raise UsageError(f"unexpected argument(s) {extra[1:]}: every input is a --flag")
        for flag in paths + specs:
            value = getattr(fv, flag)
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if v and flag in specs:
                    kind, sep, v = v.partition(":")
                    v = v if sep and not v.startswith("//") else ""  # KIND:PATH; the KIND is the command's to check
                if v:
                    storage.check(v, f"--{flag}")
    except (flags.Error, UsageError, storage.StorageError) as e:
        say(name, f"{e}\nTry `{prog} --help`.")
        return USAGE
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # libraries that log through absl need its global flags parsed
    skip_absent_tpu()
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
