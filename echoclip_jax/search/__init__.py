"""Semantic search over an archive of echo videos: embed every video and study once, then query by text,
by a video file or study directory, or by the study of an indexed video.

  python -m echoclip_jax.search build --checkpoint KIND:PATH --config C --data_dir O [--split ...] --out INDEX
  python -m echoclip_jax.search add INDEX --data_dir NEW_EXPORT        (a month's export; nothing re-embedded)
  python -m echoclip_jax.search query INDEX --text "..." | --video x.dcm | --study_of VIDEO_ID [--k 10] [--out R.json]

The vector search is faiss (faiss-cpu): one library gives exact flat inner-product search for small
archives and IVF for large ones under the same 64-bit keys, with add and remove after training (a month's
export joins the trained cells; a study whose mean changes is replaced), and prebuilt CPU wheels for Linux
and macOS. ScaNN has no macOS or Windows wheels and rebuilds its index to add data; HNSW (usearch's engine,
also in faiss) built 100k vectors of width 512 18x slower than IVF here (100 s vs 5.6 s on 2 cores,
BENCHMARKS.md) and cannot remove entries in faiss.

What an index holds (`echoclip_jax.search.archive`): the records' salted video, study and patient ids,
the split, the embeddings, the faiss indexes and non-identifying settings (the model's checkpoint spec
and config). No report text, unless `build --reports` asks for a report bank for `echoclip_jax.report`,
and then only the de-identified text the records already hold.
"""
from echoclip_jax.search.archive import Archive  # noqa: F401
from echoclip_jax.search.vectors import VectorIndex, exact_search, recall_at_k  # noqa: F401
