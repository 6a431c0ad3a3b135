"""Saliency maps of videos written for a reader: raw maps, overlays and a summary per video and prompt.

Per video and prompt, in `OUT/<video>/<pNN-prompt>/`: `<method>.npy` (float32 [K, S, S], the raw maps of
the K frames), `<method>_NNN.png` (frame NNN with the map blended in, scaled by the map's maximum over the
video, so frames are comparable), and per video `OUT/<video>/summary.json` (prompts, per-frame
similarities, map statistics, files, cam_stage); `OUT/index.json` lists the videos. Every map is zero
outside the scan sector. Videos of any lengths are mapped together in groups of fixed-size batches, so
nothing recompiles or idles. OUT is a local folder or a gs:// URL: every file is encoded in memory and
written whole (`echoclip_jax.runtime.storage`), a video's files several at once.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from matplotlib import colormaps
from PIL import Image

from echoclip_jax.data.videos import Video, sector_from_frames
from echoclip_jax.runtime import storage
from echoclip_jax.saliency.maps import METHODS, SaliencyMapper  # the maps (re-exported)

log = logging.getLogger(__name__)

GROUP_BATCHES = 4  # run(): videos are mapped together in groups of about this many frame batches
WRITERS = 16  # files of one video written at once (on a bucket each is an upload)


def prompt_slug(index: int, prompt: str) -> str:
    """A file-system-safe, unique directory name for prompt number `index`."""
    words = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48].rstrip("-")
    return f"p{index:02d}-{words}" if words else f"p{index:02d}"


def overlay(frame: np.ndarray, heat: np.ndarray, *, alpha: float = 0.6) -> np.ndarray:
    """uint8 [S, S, 3] frame with a [0, 1] heat map blended in (jet colours, opacity = alpha * heat)."""

    heat = np.clip(heat, 0.0, 1.0)
    colour = colormaps["jet"](heat)[..., :3] * 255.0
    weight = (alpha * heat)[..., None]
    return np.round(frame * (1.0 - weight) + colour * weight).astype(np.uint8)


def _write_json(path: str, obj) -> None:
    storage.write_text(path, json.dumps(obj, indent=1))


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_files(files: dict[str, bytes]) -> None:
    """Writes {path: contents}, each whole, several at once (a bucket's uploads overlap)."""
    if len(files) <= 1:
        for path, data in files.items():
            storage.write_bytes(path, data)
        return
    with ThreadPoolExecutor(min(WRITERS, len(files))) as pool:
        for _ in pool.map(lambda item: storage.write_bytes(*item), files.items()):
            pass  # re-raises the first failed write


def interpret_video(
    mapper: SaliencyMapper, video: Video, prompts: list[str], text, methods, out_dir: str, computed: dict | None = None
) -> dict:
    """Maps of every method for every prompt of one video, written under out_dir/<video.name>/
    (`computed`: {method: (maps, scores)} already computed for this video, e.g. with others at once)."""

    video_dir = storage.join(out_dir, video.name)
    sector = video.sector if video.sector is not None else sector_from_frames(video.frames)
    entries = [{"prompt": p, "dir": prompt_slug(i, p), "maps": {}} for i, p in enumerate(prompts)]
    files: dict[str, bytes] = {}
    for method in methods:
        maps, scores = computed[method] if computed else mapper.maps(method, video.frames, text)
        maps = maps * sector  # nothing outside the scan sector is evidence
        for entry, prompt_maps, prompt_scores in zip(entries, maps, scores):
            prompt_dir = storage.join(video_dir, entry["dir"])
            files[storage.join(prompt_dir, f"{method}.npy")] = npy_bytes(prompt_maps.astype(np.float32))
            top = float(prompt_maps.max())
            scaled = prompt_maps / top if top > 0 else np.zeros_like(prompt_maps)
            for k, (frame, heat) in enumerate(zip(video.frames, scaled)):
                files[storage.join(prompt_dir, f"{method}_{k:03d}.png")] = png_bytes(overlay(frame, heat))
            peak = np.unravel_index(int(prompt_maps.argmax()), prompt_maps.shape)
            entry["similarity"] = [round(float(s), 6) for s in prompt_scores]
            entry["mean_similarity"] = float(np.mean(prompt_scores))
            entry["maps"][method] = {
                "file": f"{method}.npy",
                "png": f"{method}_NNN.png",
                "max": top,
                "mean": float(prompt_maps.mean()),
                "peak_frame_y_x": [int(v) for v in peak],
            }
    summary = {
        "video": video.name,
        "source": video.source,
        "num_frames": int(len(video.frames)),
        "image_size": int(video.frames.shape[1]),
        "frame_indices": video.frame_indices,
        "methods": list(methods),
        "prompts": entries,
        "sector_pixels": int(sector.sum()),
        "map_shape": [int(len(video.frames)), int(video.frames.shape[1]), int(video.frames.shape[2])],
    }
    if "promptcam" in methods:
        summary["cam_stage"] = {"stage": mapper.cam_stage, "grid": mapper.cam_grid_size()}
    if "gradient" in methods and mapper.smoothgrad_samples:
        summary["smoothgrad"] = {"samples": mapper.smoothgrad_samples, "sigma": mapper.smoothgrad_sigma}
    if video.video_id:
        summary["video_id"] = video.video_id
    write_files(files)
    _write_json(storage.join(video_dir, "summary.json"), summary)  # last: a video with a summary is whole
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
    storage.makedirs(out_dir)
    index, used = [], set()
    for group in _groups(videos, mapper.batch_size * GROUP_BATCHES):
        computed = {m: mapper.maps_of_videos(m, [v.frames for v in group], text) for m in methods}
        for j, video in enumerate(group):
            base, n = video.name, 1
            while video.name in used:  # two inputs with the same file name
                n += 1
                video = dataclasses.replace(video, name=f"{base}-{n}")
            used.add(video.name)
            summary = interpret_video(
                mapper, video, prompts, text, methods, out_dir, computed={m: computed[m][j] for m in methods}
            )
            index.append(
                {
                    "video": video.name,
                    "source": video.source,
                    "num_frames": summary["num_frames"],
                    "mean_similarity": {e["prompt"]: e["mean_similarity"] for e in summary["prompts"]},
                }
            )
            log.info(
                "%s: %d frames, %d prompt(s), %s", video.name, summary["num_frames"], len(prompts), "+".join(methods)
            )
    _write_json(storage.join(out_dir, "index.json"), {"prompts": prompts, "methods": list(methods), "videos": index})
    return index
