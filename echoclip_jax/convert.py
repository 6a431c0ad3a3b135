"""Convert model weights between formats, then prove the conversion kept the model's outputs.

    python -m echoclip_jax.convert --src KIND:PATH[@STEP] --dst KIND:PATH [--config CONFIG]

Sources are read by `echoclip_jax.weights.loader.load` (the one loader every command uses; its docstring lists
the kinds: open_clip, safetensors, orbax[@STEP], params). Destinations: `open_clip` (a directory that
`open_clip.create_model_and_transforms("local-dir:DIR")` loads), `safetensors` (X.safetensors + X.json)
and `params` (a params-only Orbax checkpoint, the small optimizer-free form to share or to start a run
from). `--dtype bfloat16` halves the written weights. Either PATH may be a local path or a gs:// URL
(`--src orbax:gs://b/runs/x --dst safetensors:gs://b/share/x.safetensors`); open_clip itself loads only a
local directory, so copy an open_clip destination on a bucket down before `local-dir:`.

Which config describes the weights when the source stores one and --config is given too: the rule of
`echoclip_jax.config.model` (architecture from the stored config, which must agree with --config; run
settings such as the compute dtype from --config).

After writing, the destination is read back and the image and text embeddings of a fixed input are
compared with the source's, both computed in float32 whatever the config's compute dtype (the check
compares weights; tolerance 1e-5 for float32 weights, 2e-2 for bfloat16).
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from echoclip_jax.runtime import cli
from echoclip_jax.weights import loader as weights
from echoclip_jax.weights.conversion import DEST_KINDS, DTYPES, convert

FLAGS = cli.flag_values()
flags.DEFINE_string(
    "src",
    None,
    "KIND:PATH to read, PATH a local path or gs:// URL; KIND one of " + ", ".join(weights.SOURCE_KINDS),
    flag_values=FLAGS,
)
flags.DEFINE_string(
    "dst",
    None,
    "KIND:PATH to write, PATH a local path or gs:// URL; KIND one of " + ", ".join(DEST_KINDS),
    flag_values=FLAGS,
)
flags.DEFINE_enum("dtype", "float32", list(DTYPES), "dtype of the written floating-point weights", flag_values=FLAGS)
config_flags.DEFINE_config_file(
    "config",
    None,
    "configs/*.py: the architecture when the source does not store one "
    "(else it must agree with it), and the run settings",
    lock_config=False,
    flag_values=FLAGS,
)
flags.mark_flags_as_required(["src", "dst"], flag_values=FLAGS)


def _convert(f) -> None:
    try:  # before any weights are read: a KIND:PATH with a bad kind, scheme or bucket is a usage error
        weights.check_spec(f.src, "--src")
        weights.check_spec(f.dst, "--dst", DEST_KINDS)
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    errors = convert(f.src, f.dst, f.config.model if f.config is not None else None, f.dtype)
    print(
        f"converted {f.src} -> {f.dst}; verified: image embeddings max rel. error {errors['image']:.2e}, text "
        f"{errors['text']:.2e} (fixed input, source vs re-read destination)"
    )


def main(argv: list[str] | None = None) -> int:
    # RuntimeError: the written weights did not reproduce the source's embeddings
    return cli.run(_convert, FLAGS, argv, name="convert", doc=__doc__, failures=(*cli.FAILURES, RuntimeError))


if __name__ == "__main__":
    sys.exit(main())
