"""Building blocks of the trainer's input pipeline (the public API is `agentlm_jax.input_pipeline`).

  tfrecord_source.py   the dataset dir (manifest, shard files) and a random-access record source over
                       TFRecord files, local or `gs://`
  packing.py           per-conversation next-token features and first-fit packing into fixed-length rows
"""
