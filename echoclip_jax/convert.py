"""Convert model weights between formats, then prove the conversion kept the model's outputs.

    python -m echoclip_jax.convert --src KIND:PATH[@STEP] --dst KIND:PATH [--config CONFIG]

Sources are read by `echoclip_jax.weights.load` (the one loader every command uses; its docstring lists
the kinds: open_clip, safetensors, orbax[@STEP], params). Destinations: `open_clip` (a directory that
`open_clip.create_model_and_transforms("local-dir:DIR")` loads), `safetensors` (X.safetensors + X.json)
and `params` (a params-only Orbax checkpoint, the small optimizer-free form to share or to start a run
from). `--dtype bfloat16` halves the written weights.

Which config describes the weights when the source stores one and --config is given too: the rule of
`echoclip_jax.config.model` (architecture from the stored config, which must agree with --config; run
settings such as the compute dtype from --config).

After writing, the destination is read back and the image and text embeddings of a fixed input are
compared with the source's, both computed in float32 whatever the config's compute dtype (the check
compares weights; tolerance 1e-5 for float32 weights, 2e-2 for bfloat16).
"""
from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from echoclip_jax.runtime import logs
from echoclip_jax.weights import loader as weights
from echoclip_jax.weights.conversion import DEST_KINDS, DTYPES, convert

# ---------------------------------------------------------------- writers


# ---------------------------------------------------------------- verification


FLAGS = flags.FLAGS


def main(argv):
    del argv

    logs.setup()
    config = FLAGS.config
    try:
        errors = convert(FLAGS.src, FLAGS.dst, config.model if config is not None else None, FLAGS.dtype)
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 1
    print(f"converted {FLAGS.src} -> {FLAGS.dst}; verified: image embeddings max rel. error "
          f"{errors['image']:.2e}, text {errors['text']:.2e} (fixed input, source vs re-read destination)")
    return 0


if __name__ == "__main__":
    flags.DEFINE_string("src", None, "KIND:PATH to read; KIND one of " + ", ".join(weights.SOURCE_KINDS), required=True)
    flags.DEFINE_string("dst", None, "KIND:PATH to write; KIND one of " + ", ".join(DEST_KINDS), required=True)
    flags.DEFINE_enum("dtype", "float32", list(DTYPES), "dtype of the written floating-point weights")
    config_flags.DEFINE_config_file("config", None, "configs/*.py: the architecture when the source does not "
                                    "store one (else it must agree with it), and the run settings",
                                    lock_config=False)
    app.run(main)
