"""Stage 1: raw agent trajectories and chat logs → η-mixed, loss-masked, sharded TFRecords.

The public API (importing this package stays light: no Apache Beam until a build runs):

    from data_pipeline import build_sample_dataset
    manifest = build_sample_dataset("data/sample")    # the bundled sample, as `python -m data_pipeline.build`

`data_pipeline.formats` holds what the trainer reads (record schema, dataset directory, tokenizer, chat
template); everything else here is the build.
"""

from __future__ import annotations

from data_pipeline.formats.dataset import SAMPLE_DATASET_DIR


def build_sample_dataset(output_dir: str = SAMPLE_DATASET_DIR, overwrite: bool = False) -> dict:
    """Builds the embedded sample dataset (the pipeline's defaults) into `output_dir`; returns its manifest.
    A non-empty `output_dir` is refused (data_pipeline.errors.OutputError) unless `overwrite`."""
    from data_pipeline.build import run
    from data_pipeline.config import PipelineConfig

    return run(PipelineConfig(output=output_dir), overwrite=overwrite)


__all__ = ["SAMPLE_DATASET_DIR", "build_sample_dataset"]
