"""Retrieval over an archive of echo videos: the on-disk index (salted ids, embeddings, a faiss index per
level), its vectors, embeddings streamed from records and files, report banks, and the build / add /
query operations behind `python -m echoclip_jax.search`.
"""
