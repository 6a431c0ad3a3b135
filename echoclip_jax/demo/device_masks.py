"""The synthetic cohort's device masks as saliency-score cases: for each device video of a split of records
(version 2: a video whose study has the device AND whose view shows it, truth `<device>_visible`), that
device's prompt (its zero-shot task's first label source; MitraClip: the ONE/TWO sentence matching the
study's clip count) and the device's true mask in the record's pixels.

A record holds the scan sector cropped and resized (data_prep.shards.convert_video): K evenly spaced frames
(`dicom_io.kept_indices`) read at a reduced scale (`dicom_io.read_frames_scaled`, min side 1.25 x the
image size), the sector found on those pixels (`sector.sector_mask`, the header's regions scaled), then
blanked outside it, square-cropped and resized (`sector.crop_resize`). `record_truth` pushes the cohort's
device mask through those very functions, as a 0/255 grey video (box-reduced by the same scale, cropped
and resized by the same call), and keeps the pixels at least half covered: the mask and the record's
frames cannot disagree about the geometry, because one code path made both.
"""

from __future__ import annotations

import os

import numpy as np

from data_prep import dicom_io, sector
from data_prep.synthetic import device_mask, truth_by_video_id
from echoclip_jax.data import loader as data
from echoclip_jax.data.videos import to_output
from echoclip_jax.evaluation import task_table
from echoclip_jax.saliency import scores
from echoclip_jax.saliency.maps import DEFAULT_SCORE_METHODS

DEVICES = ("pacemaker", "tavr", "mitraclip")


def record_truth(
    cohort_dir: str, rel_path: str, device: str, *, image_size: int, record_frames: int, positions
) -> tuple[np.ndarray, np.ndarray]:
    """The device mask [k, S, S] of record frames `positions` (of the record's `record_frames`) and the
    record's scan sector [S, S], for the DICOM `rel_path` of a version-2 synthetic cohort, converted by
    data_prep.convert at `image_size` (frame selection, scale, sector, crop and resize as it does them)."""
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; expected one of {DEVICES}")
    path = os.path.join(cohort_dir, rel_path)
    header = dicom_io.read_header(path, max_pixels=1 << 40)
    indices = dicom_io.kept_indices(header.num_frames, record_frames)
    if len(indices) != record_frames:
        raise ValueError(
            f"the record has {record_frames} frames, its DICOM {header.num_frames}: not this cohort's conversion"
        )
    raw, scale = dicom_io.read_frames_scaled(
        path, indices, header.rows * header.cols, min_side=image_size * 5 // 4, keep_grey=True
    )
    regions = tuple(tuple(v // scale for v in box) for box in header.regions)
    found = sector.sector_mask(raw, regions)
    dicom_frames = [indices[p] for p in positions]
    truth = device_mask(cohort_dir, rel_path, device)[dicom_frames]
    if truth.shape[1:] != (header.rows, header.cols):
        raise ValueError(f"{rel_path}: device mask {truth.shape[1:]} but the DICOM is {header.rows}x{header.cols}")
    reduced = np.stack([dicom_io.box_reduce(m.astype(np.uint8)[..., None] * 255, scale)[..., 0] for m in truth])
    if reduced.shape[1:] != found.shape:
        raise ValueError(f"{rel_path}: reduced mask {reduced.shape[1:]} does not match the frames {found.shape}")
    return to_output(reduced, found, image_size), to_output(found, found, image_size)


def visible_devices(row: dict) -> list[str]:
    """The devices a truth row's video shows (cohort version 2's `<device>_visible` columns)."""
    if "pacemaker_visible" not in row:
        raise ValueError("truth has no <device>_visible columns: scoring needs a cohort_version 2 cohort")
    return [d for d in DEVICES if row.get(f"{d}_visible") == "1"]


def device_prompts(tasks_path: str | None = None) -> dict:
    """{device: {clips: prompt}} from the zero-shot table (clips matter for MitraClip only: 0 = any)."""
    tasks = {t.name: t for t in task_table.load_tasks(tasks_path, names=list(DEVICES))}
    out = {d: {0: tasks[d].label_sources[0].strip()} for d in DEVICES}
    for n, word in ((1, "ONE "), (2, "TWO ")):
        out["mitraclip"][n] = next(
            (s.strip() for s in tasks["mitraclip"].label_sources if s.startswith(word)), out["mitraclip"][0]
        )
    return out


def _prompt(prompts: dict, device: str, row: dict) -> str:
    clips = int(row.get("n_mitraclips") or 0) if device == "mitraclip" else 0
    return prompts[device].get(clips, prompts[device][0])


def device_cases(data_dir: str, split: str, truth: dict, *, cohort_dir: str, image_size: int, frames: int, limit: int):
    """(device, truth row, frames [k, S, S, 3], masks [k, S, S], sector [S, S]) for each device a video
    of the split shows, the first `limit` such videos (0 = all) in shard order, k = `frames` record frames
    (0 = all) picked as interpret does."""
    used = 0
    for item in data.iterate_videos(data_dir, split, frames=frames or None):
        row = truth.get(str(item["video_id"]))
        if row is None:
            raise ValueError(f"a {split} record has no truth row: wrong --salt_file or cohort for these records")
        devices = visible_devices(row)
        if not devices:
            continue
        if limit and used >= limit:
            return
        used += 1
        clip = np.asarray(item["frames"], np.uint8)
        if clip.shape[1] != image_size:
            raise ValueError(
                f"records are {clip.shape[1]} px, the model {image_size}: score records "
                f"converted at the model's image size"
            )
        for device in devices:
            masks, found = record_truth(
                cohort_dir,
                row["path"],
                device,
                image_size=image_size,
                record_frames=item["num_frames"],
                positions=item["positions"],
            )
            yield device, row, clip, masks, found


def score(
    mapper,
    *,
    data_dir: str,
    split: str,
    cohort_dir: str,
    salt: bytes,
    out_dir: str,
    methods=DEFAULT_SCORE_METHODS,
    frames: int = 4,
    limit: int = 40,
    tasks_path: str | None = None,
) -> dict:
    """Score every method's maps (`echoclip_jax.saliency.scores`) on a split's device videos against the
    devices' true masks; writes OUT/scores.json and OUT/score_frames.png and returns the scores."""
    prompts = device_prompts(tasks_path)
    truth = truth_by_video_id(cohort_dir, salt)
    cases = [
        scores.Case(
            target=device,
            prompt=_prompt(prompts, device, row),
            video=row["path"],
            frames=clip,
            masks=masks,
            sector=found,
        )
        for device, row, clip, masks, found in device_cases(
            data_dir, split, truth, cohort_dir=cohort_dir, image_size=mapper.image_size, frames=frames, limit=limit
        )
    ]
    if not cases:
        raise ValueError(f"no device videos in the {split} split (is the cohort version 2?)")
    meta = {"split": split, "frames_per_video": frames, "prompts": {d: prompts[d] for d in DEVICES}}
    return scores.score_cases(mapper, cases, targets=DEVICES, out_dir=out_dir, methods=methods, meta=meta)
