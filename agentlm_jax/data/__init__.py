"""The trainer's input pipeline: TFRecord shards (local or `gs://`) → host-local packed batches → global arrays.

  dataset.py      a dataset dir's shard files, and random access to their records (grain's data source)
  packing.py      per-conversation next-token features, first-fit packing into fixed-length rows, BATCH_KEYS
  iterator.py     the checkpointable training stream and the validation pass (grain), per host
  host_shard.py   which rows each host reads; host batches → global, batch-sharded jax.Arrays
"""
