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
(echoclip_jax.saliency.truth.sector_from_frames).

Outputs, per video and prompt, in `OUT/<video>/<pNN-prompt>/`: `<method>.npy` (float32 [K, S, S], the
raw maps of the K frames), `<method>_NNN.png` (frame NNN with the map blended in, scaled by the map's
maximum over the video, so frames are comparable), and per video `OUT/<video>/summary.json` (prompts,
per-frame similarities, map statistics, files, cam_stage). `OUT/index.json` lists the videos. Frames are
read the way data_prep.convert reads them (DICOM: scan sector only, so burned-in text never reaches an
overlay; AVI: resize only), and a DICOM's output is named by a hash of its path, never by its file name
or header values; a record's by its salted video id.

With `--score_truth COHORT --salt_file F` (records of a version-2 synthetic cohort) no maps are written:
the maps of `--score_methods` are scored against the devices' true masks (pointing game, mass share, and
uniform and centre baselines) into OUT/scores.json and OUT/score_frames.png; echoclip_jax.saliency.scores.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys

import numpy as np

from echoclip_jax.saliency.maps import DEFAULT_SCORE_METHODS, METHODS, SaliencyMapper  # the maps (re-exported)

GROUP_BATCHES = 4  # run(): videos are mapped together in groups of about this many frame batches


# ----------------------------------------------------------------------------------------- videos


@dataclasses.dataclass
class Video:
    name: str  # output directory name: never a DICOM file name or header value
    source: str  # dicom | avi | npy | record
    frames: np.ndarray  # uint8 [K, S, S, 3]
    frame_indices: list[int] | None  # which frames of the file (records: of the record) were kept
    video_id: str = ""  # records: the salted hash
    sector: np.ndarray | None = None  # boolean [S, S] scan sector; None: sector_from_frames(frames)


def _even(num_frames: int, frames: int) -> list[int]:
    from data_prep.dicom_io import kept_indices

    return kept_indices(num_frames, frames)


def load_video(path: str, *, image_size: int, frames: int = 0) -> Video:
    """A .dcm, .avi or .npy video as uint8 [K, image_size, image_size, 3], K = `frames` evenly spaced
    frames (0 = all). DICOM: scan sector masked and cropped as data_prep does; AVI and .npy (already
    masked, like EchoNet): resized only."""
    from data_prep import dicom_io, echonet, sector
    from data_prep.dicom_io import SkipVideo
    from echoclip_jax.saliency.truth import to_output

    ext = os.path.splitext(path)[1].lower()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such video file")
    try:
        if ext == ".dcm":
            header = dicom_io.read_header(path)
            indices = _even(header.num_frames, frames)
            raw = dicom_io.read_frames(path, indices)
            found = sector.sector_mask(raw, header.regions)
            out = sector.crop_resize(raw, found, image_size)
            name = "dicom-" + hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:12]
            return Video(name, "dicom", out, indices, sector=to_output(found, found, image_size))
        if ext == ".avi":
            raw = echonet.read_frames(path, None)
            indices = _even(len(raw), frames)
            out = sector.crop_resize(raw[indices], np.ones(raw.shape[1:3], bool), image_size)
            return Video(_safe_name(path), "avi", out, indices)
        if ext == ".npy":
            raw = _read_npy(path)
            indices = _even(len(raw), frames)
            out = sector.crop_resize(raw[indices], np.ones(raw.shape[1:3], bool), image_size)
            return Video(_safe_name(path), "npy", out, indices)
    except SkipVideo as e:
        raise ValueError(f"{path}: cannot read video ({e})") from None
    raise ValueError(f"{path}: unsupported video type {ext!r}; expected .dcm, .avi or .npy")


def _read_npy(path: str) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable .npy array ({e})") from None
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8 or len(arr) == 0:
        raise ValueError(f"{path}: expected uint8 RGB frames [T, H, W, 3] or [H, W, 3], "
                         f"got {arr.dtype} {arr.shape}")
    return arr


def _safe_name(path: str) -> str:
    stem = os.path.splitext(os.path.basename(path))[0]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "video"


def record_videos(data_dir: str, split: str, *, image_size: int, frames: int = 0, limit: int = 0):
    """Videos of a split of records (data_prep.convert output), named by their salted video_id; `frames`
    of the record's frames picked as evaluation does (data.pick_frames), their positions in frame_indices."""
    from echoclip_jax.data import loader as data

    for i, item in enumerate(data.iterate_videos(data_dir, split, frames=frames or None, image_size=image_size)):
        if limit and i >= limit:
            return
        video_id = str(item["video_id"])
        yield Video(_safe_name(video_id), "record", np.asarray(item["frames"], np.uint8), item["positions"],
                    video_id)


# ---------------------------------------------------------------------------------------- outputs


def prompt_slug(index: int, prompt: str) -> str:
    """A file-system-safe, unique directory name for prompt number `index`."""
    words = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48].rstrip("-")
    return f"p{index:02d}-{words}" if words else f"p{index:02d}"


def overlay(frame: np.ndarray, heat: np.ndarray, *, alpha: float = 0.6) -> np.ndarray:
    """uint8 [S, S, 3] frame with a [0, 1] heat map blended in (jet colours, opacity = alpha * heat)."""
    from matplotlib import colormaps

    heat = np.clip(heat, 0.0, 1.0)
    colour = colormaps["jet"](heat)[..., :3] * 255.0
    weight = (alpha * heat)[..., None]
    return np.round(frame * (1.0 - weight) + colour * weight).astype(np.uint8)


def _write_json(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def interpret_video(mapper: SaliencyMapper, video: Video, prompts: list[str], text, methods,
                    out_dir: str, computed: dict | None = None) -> dict:
    """Maps of every method for every prompt of one video, written under out_dir/<video.name>/
    (`computed`: {method: (maps, scores)} already computed for this video, e.g. with others at once)."""
    from PIL import Image

    from echoclip_jax.saliency.truth import sector_from_frames

    video_dir = os.path.join(out_dir, video.name)
    sector = video.sector if video.sector is not None else sector_from_frames(video.frames)
    entries = [{"prompt": p, "dir": prompt_slug(i, p), "maps": {}} for i, p in enumerate(prompts)]
    for method in methods:
        maps, scores = computed[method] if computed else mapper.maps(method, video.frames, text)
        maps = maps * sector  # nothing outside the scan sector is evidence
        for entry, prompt_maps, prompt_scores in zip(entries, maps, scores):
            prompt_dir = os.path.join(video_dir, entry["dir"])
            os.makedirs(prompt_dir, exist_ok=True)
            np.save(os.path.join(prompt_dir, f"{method}.npy"), prompt_maps.astype(np.float32))
            top = float(prompt_maps.max())
            scaled = prompt_maps / top if top > 0 else np.zeros_like(prompt_maps)
            for k, (frame, heat) in enumerate(zip(video.frames, scaled)):
                Image.fromarray(overlay(frame, heat)).save(os.path.join(prompt_dir, f"{method}_{k:03d}.png"))
            peak = np.unravel_index(int(prompt_maps.argmax()), prompt_maps.shape)
            entry["similarity"] = [round(float(s), 6) for s in prompt_scores]
            entry["mean_similarity"] = float(np.mean(prompt_scores))
            entry["maps"][method] = {"file": f"{method}.npy", "png": f"{method}_NNN.png",
                                     "max": top, "mean": float(prompt_maps.mean()),
                                     "peak_frame_y_x": [int(v) for v in peak]}
    summary = {"video": video.name, "source": video.source, "num_frames": int(len(video.frames)),
               "image_size": int(video.frames.shape[1]), "frame_indices": video.frame_indices,
               "methods": list(methods), "prompts": entries, "sector_pixels": int(sector.sum()),
               "map_shape": [int(len(video.frames)), int(video.frames.shape[1]), int(video.frames.shape[2])]}
    if "promptcam" in methods:
        summary["cam_stage"] = {"stage": mapper.cam_stage, "grid": mapper.cam_grid_size()}
    if "gradient" in methods and mapper.smoothgrad_samples:
        summary["smoothgrad"] = {"samples": mapper.smoothgrad_samples, "sigma": mapper.smoothgrad_sigma}
    if video.video_id:
        summary["video_id"] = video.video_id
    os.makedirs(video_dir, exist_ok=True)
    _write_json(os.path.join(video_dir, "summary.json"), summary)
    return summary


def _groups(videos, frames_per_group: int):
    """Consecutive videos in lists of at least `frames_per_group` frames (the last list: what is left)."""
    group, count = [], 0
    for video in videos:
        group.append(video)
        count += len(video.frames)
        if count >= frames_per_group:
            yield group
            group, count = [], 0
    if group:
        yield group


def run(mapper: SaliencyMapper, *, prompts: list[str], out_dir: str, videos, methods=METHODS) -> list[dict]:
    """Saliency maps of every video (an iterable of Video) for every prompt; OUT/index.json lists them."""
    if not prompts:
        raise ValueError("at least one prompt is needed")
    text = mapper.text_embeddings(prompts)
    os.makedirs(out_dir, exist_ok=True)
    index, used = [], set()
    for group in _groups(videos, mapper.batch_size * GROUP_BATCHES):
        computed = {m: mapper.maps_of_videos(m, [v.frames for v in group], text) for m in methods}
        for j, video in enumerate(group):
            base, n = video.name, 1
            while video.name in used:  # two inputs with the same file name
                n += 1
                video = dataclasses.replace(video, name=f"{base}-{n}")
            used.add(video.name)
            summary = interpret_video(mapper, video, prompts, text, methods, out_dir,
                                      computed={m: computed[m][j] for m in methods})
            index.append({"video": video.name, "source": video.source, "num_frames": summary["num_frames"],
                          "mean_similarity": {e["prompt"]: e["mean_similarity"] for e in summary["prompts"]}})
            print(f"{video.name}: {summary['num_frames']} frames, {len(prompts)} prompt(s), "
                  f"{'+'.join(methods)}", flush=True)
    _write_json(os.path.join(out_dir, "index.json"), {"prompts": prompts, "methods": list(methods),
                                                       "videos": index})
    return index


# -------------------------------------------------------------------------------------------- CLI


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "experiment config (configs/*.py)")
    flags.DEFINE_string("checkpoint", None, "weights, KIND:PATH (open_clip, safetensors, orbax, params), "
                                            "as echoclip_jax.convert reads them")
    flags.DEFINE_multi_string("video", None, "a video: .dcm, .avi or .npy (uint8 [T, H, W, 3]); repeatable")
    flags.DEFINE_string("data_dir", None, "records from data_prep.convert (batch mode)")
    flags.DEFINE_string("split", "test", "with --data_dir: the split")
    flags.DEFINE_integer("limit", 0, "with --data_dir: at most this many videos (0 = all)")
    flags.DEFINE_multi_string("prompt", None, "a text prompt; repeatable")
    flags.DEFINE_string("out", None, "output directory")
    flags.DEFINE_enum("method", "both", ["promptcam", "gradient", "both"], "saliency method")
    flags.DEFINE_integer("frames", 0, "frames per video, evenly spaced (0 = all)")
    flags.DEFINE_integer("batch_size", 16, "frames per jitted batch, over all devices")
    flags.DEFINE_integer("smoothgrad", 0, "gradient maps: average over this many noisy copies (0 = plain)")
    flags.DEFINE_float("smoothgrad_sigma", 0.15, "SmoothGrad noise, as a fraction of the 0..255 range")
    flags.DEFINE_string("cam_stage", "last", "PromptCAM's ConvNeXt stage: last (EchoCLIP's, stride 32) or "
                                             "0..3 (stride 4 * 2**stage: 1 = 8x8 at 64 px)")
    flags.DEFINE_string("score_truth", None, "a version-2 synthetic cohort: score the maps of --data_dir's "
                                             "device videos against its device masks (no maps written)")
    flags.DEFINE_string("salt_file", None, "with --score_truth: the salt the records were converted with")
    flags.DEFINE_string("score_methods", ",".join(DEFAULT_SCORE_METHODS), "with --score_truth: maps to score, "
                        "comma-separated: promptcam[:last|0..3], gradient, smoothgrad:N")
    return flags.FLAGS


def main(argv):
    del argv
    from echoclip_jax.runtime import logs

    logs.setup()
    f = FLAGS
    if f.config is None or f.checkpoint is None or f.out is None or not (f.prompt or f.score_truth):
        sys.exit("interpret: --config, --checkpoint, --prompt and --out are required")
    if f.score_truth and (not f.data_dir or not f.salt_file or f.video or f.prompt):
        sys.exit("interpret: --score_truth needs --data_dir and --salt_file (its prompts are the device tasks'; "
                 "no --video or --prompt)")
    if bool(f.video) == bool(f.data_dir):
        sys.exit("interpret: give --video X (.dcm/.avi/.npy) or --data_dir O, not both")
    if f.frames < 0 or f.limit < 0:
        sys.exit("interpret: --frames and --limit must be >= 0")
    from echoclip_jax import tokenizers
    from echoclip_jax.weights import loader as weights
    from echoclip_jax.config.validation import validate

    methods = METHODS if f.method == "both" else (f.method,)
    try:
        validate(f.config, training=False)
        model_config, params = weights.load(f.checkpoint, f.config.model)
        image_size = int(model_config.vision.image_size)
        mapper = SaliencyMapper(weights.make_model(model_config, params), tokenizers.from_config(f.config.tokenizer),
                                image_size=image_size, batch_size=f.batch_size, smoothgrad_samples=f.smoothgrad,
                                smoothgrad_sigma=f.smoothgrad_sigma, seed=f.config.seed, cam_stage=f.cam_stage)
        if f.score_truth:
            from data_prep.options import load_salt
            from echoclip_jax.saliency import scores as saliency_scores

            result = saliency_scores.score(mapper, data_dir=f.data_dir, split=f.split, cohort_dir=f.score_truth,
                                           salt=load_salt(salt_file=f.salt_file), out_dir=f.out,
                                           methods=f.score_methods, frames=f.frames, limit=f.limit)
            print(saliency_scores.format_scores(result))
            return
        if f.video:
            videos = (load_video(v, image_size=image_size, frames=f.frames) for v in f.video)
        else:
            videos = record_videos(f.data_dir, f.split, image_size=image_size, frames=f.frames, limit=f.limit)
        index = run(mapper, prompts=list(f.prompt), out_dir=f.out, videos=videos, methods=methods)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"interpret: {e}")
    print(f"wrote saliency maps of {len(index)} video(s) to {f.out}")


if __name__ == "__main__":
    from absl import app

    FLAGS = _define_flags()
    app.run(main)
