"""Semantic search: faiss exact and IVF indexes agree, an archive index is built, added to and queried from
records and DICOM files, on local disk or a bucket alike, and no PHI string reaches it."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pydicom
import pytest
from flax import nnx

from data_prep.plan import salted_hash
from data_prep.synthetic import read_phi
from echoclip_jax import search
from echoclip_jax.config import files
from echoclip_jax.data import loader as data
from echoclip_jax.models import build_model, preprocess_images
from echoclip_jax.retrieval import archive as archive_lib
from echoclip_jax.retrieval import ops
from echoclip_jax.retrieval.vectors import VectorIndex, exact_search, recall_at_k
from echoclip_jax.runtime import storage
from echoclip_jax.weights import conversion
from echoclip_jax.weights import loader as weights

from .conftest import REPO, tiny_overrides

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"

SALT = b"test-salt"  # conftest's records_dir converts with --salt test-salt


def _clustered(rng, n, dim=32, clusters=40, noise=0.4):
    centers = rng.normal(size=(clusters, dim))
    x = centers[rng.integers(0, clusters, n)] + noise * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_exact_and_ivf_agree_and_update(tmp_path):
    rng = np.random.default_rng(0)
    x, q = _clustered(rng, 4000), _clustered(rng, 50)
    exact = VectorIndex.build(x, np.arange(4000), kind="exact")
    ivf = VectorIndex.build(x, np.arange(4000), kind="ivf", nlist=32, nprobe=8)
    assert ivf.kind == "ivf" and ivf.nlist == 32 and len(ivf) == 4000
    e_scores, e_keys = exact.search(q, 10)
    # the exact index is brute force: the same top 10 and scores as numpy
    sims = q @ x.T
    np.testing.assert_array_equal(e_keys, np.argsort(-sims, axis=1, kind="stable")[:, :10])
    np.testing.assert_allclose(e_scores, np.sort(sims, axis=1)[:, ::-1][:, :10], atol=1e-5)
    assert recall_at_k(ivf.search(q, 10)[1], e_keys) >= 0.9
    ivf.set_nprobe(32)  # every cell scanned: IVF is exact
    a_scores, a_keys = ivf.search(q, 10)
    np.testing.assert_array_equal(a_keys, e_keys)
    np.testing.assert_allclose(a_scores, e_scores, atol=1e-5)
    # remove and re-add a key under a new vector: queries see the new one; the index survives a save
    target = int(e_keys[0, 0])
    for index in (exact, ivf):
        assert index.remove([target]) == 1
        index.add(-q[:1], [target])
        index.save(str(tmp_path / f"{index.kind}.faiss"))
        back = VectorIndex.load(str(tmp_path / f"{index.kind}.faiss"), index.kind)
        scores, keys = back.search(-q[:1], 1)
        assert keys[0, 0] == target and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    # fewer vectors than k: missing neighbours are -1
    assert list(VectorIndex.build(x[:3], [7, 8, 9], kind="exact").search(q[:1], 5)[1][0, 3:]) == [-1, -1]
    np.testing.assert_array_equal(exact_search(x, q, 10)[1], e_keys)


@pytest.fixture(params=["local", "gs"])
def root(request, tmp_path):
    """Where an index is written: a local folder, or a folder of a bucket on the test GCS server."""
    if request.param == "local":
        return str(tmp_path)
    return request.getfixturevalue("bucket") + "/archive"


def test_archive_turns_approximate_and_keeps_study_means(root):
    """approximate_above: exact while small, IVF once larger; a study's videos arriving in two exports
    give it the mean of all of them, and already indexed ids are skipped; on local disk or a bucket."""
    tmp_path = storage.path(root)
    rng = np.random.default_rng(1)
    x = _clustered(rng, 400)
    videos = [
        {"video_id": f"v{i}", "study_id": f"s{i // 2}", "patient_id": f"p{i // 4}", "split": "train"}
        for i in range(400)
    ]
    index = archive_lib.Archive.new(str(tmp_path / "idx"), model={}, dim=32, approximate_above=300)
    first = index.add(videos[:201], x[:201])  # video 201 (study s100) comes later
    assert first["added"] == 201 and index.meta["levels"]["video"]["kind"] == "exact"
    second = index.add(videos[150:], x[150:])
    assert second == {"added": 199, "skipped": 51, "new_studies": 99, "updated_studies": 1, "reports": 0}
    assert index.meta["levels"]["video"]["kind"] == "ivf" and index.meta["levels"]["study"]["kind"] == "exact"
    index.save()
    back = archive_lib.Archive.open(str(tmp_path / "idx"))
    s100 = back.study_key["s100"]
    want = x[200] + x[201]
    np.testing.assert_allclose(back.vectors["study"][s100], want / np.linalg.norm(want), atol=1e-6)
    assert back.rows["study"][s100]["videos"] == 2
    hit = back.search("study", back.vectors["study"][s100], 1)[0]
    assert hit["study_id"] == "s100" and hit["score"] == pytest.approx(1.0, abs=1e-5)
    ids = [r["video_id"] for r in back.search("video", x[7], 5, exclude={7})]
    assert "v7" not in ids and len(ids) == 5


def test_an_update_of_a_bucket_index_is_swapped_in_whole(bucket):
    """A bucket has no rename: the updated index is written beside it and copied over it, index.json last;
    a swap stopped midway is reported with the way to finish it, not read as a mix of two indexes."""
    rng = np.random.default_rng(2)
    x = _clustered(rng, 60)
    videos = [
        {"video_id": f"v{i}", "study_id": f"s{i // 3}", "patient_id": f"p{i // 6}", "split": "train"} for i in range(60)
    ]
    path = f"{bucket}/idx"
    first = archive_lib.Archive.new(path, model={}, dim=32)
    first.add(videos[:40], x[:40])
    first.save()
    grown = archive_lib.Archive.open(path)
    grown.add(videos[40:], x[40:])
    grown.save()
    assert storage.listdir(bucket) == ["idx"]  # idx.new is gone
    back = archive_lib.Archive.open(path)
    assert [r["video_id"] for r in back.rows["video"]] == [v["video_id"] for v in videos]
    np.testing.assert_array_equal(back.vectors["video"], x)
    assert back.search("video", x[50], 1)[0]["video_id"] == "v50"
    # stopped while copying: idx.new whole, idx's index.json still the old one
    storage.copytree(path, path + ".new")
    meta = storage.load_json(f"{path}.new/index.json")
    storage.dump_json(f"{path}.new/index.json", {**meta, "counts": {"videos": 61}})
    with pytest.raises(ValueError, match=r"idx.new holds the complete new index.*gcloud storage rsync"):
        archive_lib.Archive.open(path)


# ------------------------------------------------------------------------------ on real records


def init_params(model_config, seed: int) -> dict:
    model = build_model(model_config, rngs=nnx.Rngs(seed))
    return {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module")
def tiny(records_dir, tmp_path_factory):
    """configs/tiny.py with the tests' overrides, freshly initialised weights saved as safetensors, and the
    model (an initialised ConvNeXt tells the synthetic videos apart: its nearest record to a video is itself)."""

    c = files.load(CONFIGS / "tiny.py")
    for key, value in tiny_overrides(records_dir).items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    params = init_params(c.model, 0)
    path = tmp_path_factory.mktemp("model") / "m.safetensors"
    conversion.save(f"safetensors:{path}", c.model, params)
    return c, f"safetensors:{path}", weights.make_model(c.model, params)


@pytest.fixture(scope="module")
def built(records_dir, tiny, tmp_path_factory):
    config, spec, _ = tiny
    out = str(tmp_path_factory.mktemp("search") / "index")
    index = ops.build(
        out, checkpoint=spec, config=config, data_dir=records_dir, splits=["train"], report_bank=True, batch_size=16
    )
    return out, index


def _model_embedding(model, frames):
    f = np.asarray(model.encode_image(preprocess_images(frames), normalize=True))
    m = f.mean(axis=0)
    return m / np.linalg.norm(m)


def test_build_embeds_every_video_and_study(records_dir, tiny, built):
    _, _, model = tiny
    path, index = built
    train = list(data.iterate_videos(records_dir, "train"))
    assert [r["video_id"] for r in index.rows["video"]] == [v["video_id"] for v in train]
    for v in train[:6]:  # each row is the model's own mean of the video's frames
        np.testing.assert_allclose(
            index.vectors["video"][index.video_key[v["video_id"]]], _model_embedding(model, v["frames"]), atol=2e-5
        )
    studies = {v["study_id"] for v in train}
    assert len(index.rows["study"]) == len(studies) == len(index.reports)
    for s in list(studies)[:4]:
        members = [_model_embedding(model, v["frames"]) for v in train if v["study_id"] == s]
        want = np.mean(members, axis=0)
        np.testing.assert_allclose(index.vectors["study"][index.study_key[s]], want / np.linalg.norm(want), atol=3e-5)
    assert index.meta["levels"]["video"] == {"kind": "exact", "vectors": len(train)}
    reopened = archive_lib.Archive.open(path)
    assert reopened.reports == index.reports
    report_of = {v["study_id"]: v["report"] for v in train}
    assert all(reopened.reports[reopened.study_key[s]] == report_of[s] for s in studies)


def _sop_video_id(path) -> str:
    return salted_hash(SALT, "video", pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_query_a_dicom_finds_its_own_record_and_a_text_ranks_by_similarity(records_dir, built):
    """A DICOM file of the cohort, read with the sector masked as data_prep does, finds its own record first;
    a text query's scores are the text embedding's dot products with the stored embeddings."""
    _, index = built
    cohort = os.path.join(os.path.dirname(records_dir), "syn", "dicom")
    dicoms = sorted(os.path.join(d, n) for d, _, ns in os.walk(cohort) for n in ns if n.endswith(".dcm"))
    path = next(p for p in dicoms if _sop_video_id(p) in index.video_key)
    embedder = ops.embedder_for(index.meta["model"], index.meta["model"]["fingerprint"], batch_size=16)
    got = ops.query(index, video=path, k=3, embedder=embedder)
    assert got["results"]["video"][0]["video_id"] == _sop_video_id(path)
    assert got["results"]["video"][0]["score"] > 0.999
    assert got["query"]["video"].startswith("dicom-") and path not in json.dumps(got)
    text = "ECHO DENSITY IN RIGHT VENTRICLE SUGGESTIVE OF CATHETER, PACER LEAD, OR ICD LEAD."
    got = ops.query(index, text=text, k=4, embedder=embedder, levels=("study",))
    t = embedder.texts([text])[0]
    want = np.argsort(-(index.vectors["study"] @ t), kind="stable")[:4]
    assert [r["key"] for r in got["results"]["study"]] == list(want)
    np.testing.assert_allclose(
        [r["score"] for r in got["results"]["study"]], (index.vectors["study"] @ t)[want], atol=1e-5
    )


def test_cli_add_skips_indexed_videos_and_query_writes_json(records_dir, tiny, built, tmp_path):
    config, spec, _ = tiny
    path, index = built
    env = {**os.environ, "PYTHONPATH": REPO}
    run = lambda *a: subprocess.run(
        [sys.executable, "-m", "echoclip_jax.search", *a],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    r = run("add", path, "--data_dir", records_dir, "--batch_size", "16")  # train (indexed) and val (new)
    assert r.returncode == 0, r.stderr[-3000:]
    n_train, n_val = (sum(1 for _ in data.iterate_videos(records_dir, s)) for s in ("train", "val"))
    assert f"[train]: added 0 videos (0 new studies, 0 updated), skipped {n_train}" in r.stderr
    assert f"[val]: added {n_val} videos" in r.stderr
    grown = archive_lib.Archive.open(path)
    assert len(grown.rows["video"]) == n_train + n_val
    np.testing.assert_array_equal(grown.vectors["video"][:n_train], index.vectors["video"])  # not re-embedded
    video = grown.rows["video"][-1]
    r = run("query", path, "--study_of", video["video_id"], "--k", "3", "--out", str(tmp_path / "q.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads((tmp_path / "q.json").read_text())
    own = grown.study_key[video["study_id"]]
    sims = grown.vectors["study"] @ grown.vectors["study"][own]
    sims[own] = -np.inf
    assert [x["key"] for x in got["results"]["study"]] == list(np.argsort(-sims, kind="stable")[:3])
    assert all(x["study_id"] != video["study_id"] for x in got["results"]["video"])
    assert got["results"]["study"][0]["study_id"] in r.stdout
    other = tmp_path / "other.safetensors"  # the same architecture with other weights: refused
    conversion.save(f"safetensors:{other}", config.model, init_params(config.model, 1))
    overrides = [f"--config.{k}={v}" for k, v in tiny_overrides(records_dir).items() if k.startswith(("model", "tok"))]
    r = run(
        "add",
        path,
        "--data_dir",
        records_dir,
        "--checkpoint",
        f"safetensors:{other}",
        "--config",
        "configs/tiny.py",
        *overrides,
    )
    assert r.returncode == 1 and "index.json: field model.fingerprint" in r.stderr, r.stderr[-2000:]
    r = run("query", path, "--study_of", "no-such-id")
    assert r.returncode == 1 and "videos.csv: --study_of 'no-such-id'" in r.stderr


def test_build_to_a_bucket_and_query_it_as_the_local_index(records_dir, tiny, built, bucket):
    """`search build --out gs://...` writes the index a local build writes; `query` reads it from the bucket
    (faiss indexes included) and writes --out there, with the same neighbours and scores as the local index."""
    _, spec, _ = tiny
    _, local = built  # as ops.build wrote it (a later `add` in this module changes only the files)
    overrides = [f"--config.{k}={v}" for k, v in tiny_overrides(records_dir).items() if k.startswith(("model", "tok"))]
    remote = f"{bucket}/index"
    argv = ["search", "build", "--checkpoint", spec, "--config", str(CONFIGS / "tiny.py"), *overrides]
    argv += ["--data_dir", records_dir, "--split", "train", "--reports", "--out", remote, "--batch_size", "16"]
    assert search.main(argv) == 0
    assert storage.listdir(bucket) == ["index"]
    index = archive_lib.Archive.open(remote)
    assert index.rows == local.rows and index.reports == local.reports
    for level in archive_lib.LEVELS:
        np.testing.assert_allclose(index.vectors[level], local.vectors[level], atol=1e-6)
        assert index.meta["levels"][level] == local.meta["levels"][level]
    video = local.rows["video"][3]["video_id"]
    assert search.main(["search", "query", remote, "--study_of", video, "--k", "4", "--out", f"{remote}-q.json"]) == 0
    got = storage.load_json(f"{remote}-q.json")
    want = json.loads(json.dumps(ops.query(local, study_of=video, k=4)))
    for level in archive_lib.LEVELS:
        assert [r["key"] for r in got["results"][level]] == [r["key"] for r in want["results"][level]]
        np.testing.assert_allclose(
            [r["score"] for r in got["results"][level]], [r["score"] for r in want["results"][level]], atol=1e-5
        )
    assert {k: v for k, v in got.items() if k != "results"} == {k: v for k, v in want.items() if k != "results"}


def test_a_path_of_an_unsupported_scheme_or_a_missing_bucket_exits_2_naming_it(gcs_server, capsys):
    assert search.main(["search", "query", "s3://b/index", "--study_of", "x"]) == 2
    assert "INDEX=s3://b/index: the scheme s3:// is not supported" in capsys.readouterr().err
    assert search.main(["search", "query", "gs://no-such-bucket-x/index", "--study_of", "x"]) == 2
    assert "INDEX=gs://no-such-bucket-x/index: bucket gs://no-such-bucket-x does not exist" in capsys.readouterr().err
    assert search.main(["search", "query", "/tmp/index", "--study_of", "x", "--out", "s3://b/q.json"]) == 2
    assert "--out=s3://b/q.json: the scheme s3:// is not supported" in capsys.readouterr().err


def test_no_phi_in_the_index(records_dir, built):
    path, _ = built
    phi = [s.lower().encode() for s in read_phi(os.path.join(os.path.dirname(records_dir), "syn"))]
    blobs = {n: open(os.path.join(path, n), "rb").read().lower() for n in os.listdir(path)}
    assert {"index.json", "videos.csv", "studies.csv", "reports.csv", "videos.faiss"} <= set(blobs)
    assert [(n, p) for n, b in blobs.items() for p in phi if p in b] == []
    assert any(p in (b"report by " + phi[0]) for p in phi)  # the check can fail
