"""Stage 1: raw agent trajectories and chat logs → η-mixed, loss-masked, sharded TFRecords.

Importing this package must stay light (no Apache Beam): the trainer imports `data_pipeline.records`
and `data_pipeline.chat_template` from it.
"""
