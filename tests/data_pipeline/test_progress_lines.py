"""The pipeline's progress: plain log lines with done of total, rate and ETA (no terminal redraws)."""

import gzip
import json
import logging

from data_pipeline import progress as pg
from data_pipeline.beam_pipeline import ReadBatches, worker_progress_log
from data_pipeline.sources import ReadTask


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_progress_lines_have_the_total_percent_and_eta():
    handler = Lines()
    log = logging.getLogger("test.progress")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    progress = pg.Progress(log, "encoding", total=1000, every_s=0)
    progress.add(250)
    progress.add(750)
    progress.add(0)  # (the final line only once)
    assert len(handler.lines) == 2
    assert handler.lines[0].startswith("encoding: 250 records of 1,000 records (25%), ") and ", ETA " in handler.lines[0]
    assert "(100%)" in handler.lines[1] and "ETA" not in handler.lines[1]
    assert not any("\r" in line or "\x1b" in line for line in handler.lines)


def test_reading_reports_bytes_of_the_stored_file(tmp_path):
    path = tmp_path / "a.jsonl.gz"
    path.write_bytes(gzip.compress(b"".join(json.dumps({"id": i, "text": "x" * (i % 97)}).encode() + b"\n"
                                            for i in range(5000)), compresslevel=1))
    handler = Lines()
    worker_progress_log().addHandler(handler)
    try:
        reader = ReadBatches(batch_size=500, spill_dir=str(tmp_path / "spill"), progress_every_s=0)
        reader.setup()
        out = list(reader.process(ReadTask("s", "general", str(path), "jsonl")))
    finally:
        worker_progress_log().removeHandler(handler)
    assert out[-1].value == 5000  # the record count, for the encoders' total
    reading = [line for line in handler.lines if line.startswith("reading ")]
    size_mb = f"{path.stat().st_size / 2**20:,.1f} MB"
    assert reading and all(f" of {size_mb} (" in line for line in reading), handler.lines
    assert "records so far" in reading[0] and any("ETA" in line for line in reading)
