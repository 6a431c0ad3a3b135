r"""Prompt saliency maps: where in each frame the image supports a text prompt.

  python -m echoclip_jax.interpret --config configs/echoclip.py --checkpoint open_clip:/path/echoclip \
      --video study.dcm --prompt "PACEMAKER LEAD IS SEEN." --out maps/
  python -m echoclip_jax.interpret --config configs/tiny.py --checkpoint orbax:W --data_dir O --split test \
      --limit 20 --prompt "..." --prompt "..." --out maps/ --method both --frames 8 --cam_stage 1
  python -m echoclip_jax.interpret --config configs/tiny.py --checkpoint safetensors:M --data_dir O \
      --split test --limit 40 --frames 4 --score_truth COHORT --salt_file SALT --out scores/

The score is the cosine similarity between a frame's image embedding and the prompt's text embedding.
Two maps of it (echoclip_jax.saliency), both computed in one jitted call per batch of frames for all
prompts at once (videos of any lengths share the fixed-size batches, so nothing recompiles or idles):
- PromptCAM: Grad-CAM on a ConvNeXt stage, `--cam_stage` (default `last`, EchoCLIP's method, stride 32:
  2x2 at 64 px, so it cannot localise there; 0..3 = an earlier stage, stride 4 * 2**stage, e.g. 1 =
  8x8 at 64 px). Channel weights are the spatially averaged gradients of the score w.r.t. that stage's
  feature map; the map is the ReLU of the weighted channel sum, bilinearly upsampled to the input size.
- Input gradient: |d score / d pixel| (pixels on the 0..255 scale, before the model's normalisation),
  the maximum over the colour channels (Simonyan et al. 2014); optionally SmoothGrad (Smilkov et al.
  2017, `--smoothgrad N`): the gradient averaged over noisy copies of the frame before the magnitude.
Every map is zero outside the scan sector: for DICOM the sector data_prep finds, carried through the
same crop and resize; for records, AVI and .npy (blank outside the sector) where any frame is not black
(echoclip_jax.data.videos.sector_from_frames).

Outputs, per video and prompt, in `OUT/<video>/<pNN-prompt>/`: `<method>.npy` (float32 [K, S, S], the
raw maps of the K frames), `<method>_NNN.png` (frame NNN with the map blended in, scaled by the map's
maximum over the video, so frames are comparable), and per video `OUT/<video>/summary.json` (prompts,
per-frame similarities, map statistics, files, cam_stage). `OUT/index.json` lists the videos. Frames are
read the way data_prep.convert reads them (DICOM: scan sector only, so burned-in text never reaches an
overlay; AVI: resize only), and a DICOM's output is named by a hash of its path, never by its file name
or header values; a record's by its salted video id.

With `--score_truth COHORT --salt_file F` (records of a version-2 synthetic cohort) no maps are written:
the maps of `--score_methods` are scored against the devices' true masks (pointing game, mass share, and
uniform and centre baselines) into OUT/scores.json and OUT/score_frames.png (`echoclip_jax.saliency.scores`,
the cohort's masks from `echoclip_jax.demo.device_masks`).

--out, --video, --data_dir, --salt_file and the PATH of --checkpoint are local paths or gs:// URLs; the
synthetic cohort of --score_truth is read from local disk.
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from data_prep.options import load_salt
from echoclip_jax import tokenizers
from echoclip_jax.config.validation import validate
from echoclip_jax.data.videos import load_video, record_videos
from echoclip_jax.demo import device_masks
from echoclip_jax.runtime import cli, storage
from echoclip_jax.saliency import scores
from echoclip_jax.saliency.maps import DEFAULT_SCORE_METHODS, METHODS, SaliencyMapper
from echoclip_jax.saliency.outputs import run
from echoclip_jax.weights import loader as weights

FLAGS = cli.flag_values()
config_flags.DEFINE_config_file("config", None, "experiment config (configs/*.py)", flag_values=FLAGS)
flags.DEFINE_string(
    "checkpoint",
    None,
    "weights, KIND:PATH (open_clip, safetensors, orbax, params), as echoclip_jax.convert reads them; PATH a "
    "local path or gs:// URL",
    flag_values=FLAGS,
)
flags.DEFINE_multi_string(
    "video",
    None,
    "a video: .dcm, .avi or .npy (uint8 [T, H, W, 3]), local path or gs:// URL; repeatable",
    flag_values=FLAGS,
)
flags.DEFINE_string(
    "data_dir", None, "records from data_prep.convert (batch mode): local path or gs:// URL", flag_values=FLAGS
)
flags.DEFINE_string("split", "test", "with --data_dir: the split", flag_values=FLAGS)
flags.DEFINE_integer(
    "limit", 0, "with --data_dir: at most this many videos (0 = all)", lower_bound=0, flag_values=FLAGS
)
flags.DEFINE_multi_string("prompt", None, "a text prompt; repeatable", flag_values=FLAGS)
flags.DEFINE_string("out", None, "output directory: local path or gs:// URL", flag_values=FLAGS)
flags.DEFINE_enum("method", "both", ["promptcam", "gradient", "both"], "saliency method", flag_values=FLAGS)
flags.DEFINE_integer("frames", 0, "frames per video, evenly spaced (0 = all)", lower_bound=0, flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 16, "frames per jitted batch, over all devices", flag_values=FLAGS)
flags.DEFINE_integer(
    "smoothgrad", 0, "gradient maps: average over this many noisy copies (0 = plain)", flag_values=FLAGS
)
flags.DEFINE_float("smoothgrad_sigma", 0.15, "SmoothGrad noise, as a fraction of the 0..255 range", flag_values=FLAGS)
flags.DEFINE_string(
    "cam_stage",
    "last",
    "PromptCAM's ConvNeXt stage: last (EchoCLIP's, stride 32) or 0..3 (stride 4 * 2**stage: 1 = 8x8 at 64 px)",
    flag_values=FLAGS,
)
flags.DEFINE_string(
    "score_truth",
    None,
    "a version-2 synthetic cohort (local directory): score the maps of --data_dir's device "
    "videos against its device masks (no maps written)",
    flag_values=FLAGS,
)
flags.DEFINE_string(
    "salt_file",
    None,
    "with --score_truth: the salt the records were converted with (local path or gs:// URL)",
    flag_values=FLAGS,
)
flags.DEFINE_string(
    "score_methods",
    ",".join(DEFAULT_SCORE_METHODS),
    "with --score_truth: maps to score, comma-separated: promptcam[:last|0..3], gradient, smoothgrad:N",
    flag_values=FLAGS,
)
flags.mark_flags_as_required(["config", "checkpoint", "out"], flag_values=FLAGS)


def _interpret(f) -> None:
    if f.score_truth and (not f.data_dir or not f.salt_file or f.video or f.prompt):
        raise cli.UsageError(
            "--score_truth needs --data_dir and --salt_file (its prompts are the device tasks'; no --video or --prompt)"
        )
    if not (f.prompt or f.score_truth):
        raise cli.UsageError("give --prompt (repeatable), or --score_truth")
    if bool(f.video) == bool(f.data_dir):
        raise cli.UsageError("give --video X (.dcm/.avi/.npy) or --data_dir O, not both")
    if f.score_truth and storage.is_remote(f.score_truth):
        raise cli.UsageError(
            f"--score_truth={f.score_truth}: the synthetic cohort's DICOMs and masks are read from local disk; "
            f"copy it here first (`gcloud storage cp -r {f.score_truth} .`)"
        )
    try:
        weights.check_spec(f.checkpoint, "--checkpoint")
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    validate(f.config, training=False)
    model_config, params = weights.load(f.checkpoint, f.config.model)
    image_size = int(model_config.vision.image_size)
    mapper = SaliencyMapper(
        weights.make_model(model_config, params),
        tokenizers.from_config(f.config.tokenizer),
        image_size=image_size,
        batch_size=f.batch_size,
        smoothgrad_samples=f.smoothgrad,
        smoothgrad_sigma=f.smoothgrad_sigma,
        seed=f.config.seed,
        cam_stage=f.cam_stage,
    )
    if f.score_truth:
        result = device_masks.score(
            mapper,
            data_dir=f.data_dir,
            split=f.split,
            cohort_dir=f.score_truth,
            salt=load_salt(salt_file=f.salt_file),
            out_dir=f.out,
            methods=f.score_methods,
            frames=f.frames,
            limit=f.limit,
        )
        print(scores.format_scores(result))
        return
    if f.video:
        videos = (load_video(v, image_size=image_size, frames=f.frames) for v in f.video)
    else:
        videos = record_videos(f.data_dir, f.split, image_size=image_size, frames=f.frames, limit=f.limit)
    methods = METHODS if f.method == "both" else (f.method,)
    index = run(mapper, prompts=list(f.prompt), out_dir=f.out, videos=videos, methods=methods)
    print(f"wrote saliency maps of {len(index)} video(s) to {f.out}")


def main(argv: list[str] | None = None) -> int:
    return cli.run(
        _interpret,
        FLAGS,
        argv,
        name="interpret",
        doc=__doc__,
        paths=("video", "data_dir", "out", "score_truth", "salt_file"),
    )


if __name__ == "__main__":
    sys.exit(main())
