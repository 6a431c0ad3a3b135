"""echoclip_jax: EchoCLIP-style echocardiography CLIP training in JAX/Flax.

The files here are the commands (`python -m echoclip_jax.<command>`: train, evaluate, probe, probe_labels,
interpret, embed, convert, aot, report, search, train_sentencepiece; the demo is `demo/__main__.py`); each
parses its flags (`runtime.cli`) and calls the library, one package per capability:

  config      defaults, the start-up check of a config, which config describes weights, config files
  runtime     mesh and sharding rules, multi-process set-up, the command convention, logs, storage
  models      the Flax NNX towers and their per-backend choices
  tokenizers  CLIP BPE, the template tokenizer, SentencePiece
  data        records through grain (exact-resume loaders), videos from any file
  training    the train step and loop, losses, optimiser, checkpoints, the step compiled for a TPU slice
  weights     the one loader of weights, the open_clip layout, conversion
  inference   a model on every local device, the embedder
  evaluation  zero-shot tasks, metrics, study level, sweeps and their outputs
  probes      linear and attentive probes on frozen embeddings
  saliency    saliency maps, their outputs and their scores against truth masks
  retrieval   the search index, report banks, preliminary reports by retrieval
  demo        the main job on the synthetic cohort (the only reader of data_prep.synthetic)

Layers point one way: commands -> capabilities -> models, data, runtime; data_prep (offline, no JAX) below,
with the one exception of runtime.storage, which both use (it imports no JAX and nothing else of the project).
"""
