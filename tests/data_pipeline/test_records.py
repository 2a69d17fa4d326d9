"""data_pipeline.formats.records against TensorFlow's own tf.train.Example parser and TFRecord reader/writer."""

import io

import numpy as np
import pytest

from data_pipeline.formats import records

tf = pytest.importorskip("tensorflow")

FEATURES = {
    "input_ids": tf.io.VarLenFeature(tf.int64),
    "loss_mask": tf.io.VarLenFeature(tf.int64),
    "source": tf.io.FixedLenFeature([], tf.string),
    "task": tf.io.FixedLenFeature([], tf.string),
    "id": tf.io.FixedLenFeature([], tf.string),
}


def make_records(n=20, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(1, 300))
        out.append(records.Record(
            input_ids=rng.integers(0, 32000, length, dtype=np.int32),
            loss_mask=rng.integers(0, 2, length, dtype=np.int32),
            source="agent" if i % 3 else "general", task=["os", "db", "sharegpt_gpt4", "ünïcode"][i % 4],
            id=f"rec_{i}"))
    return out


def tf_parse(payload: bytes) -> dict:
    parsed = tf.io.parse_single_example(payload, FEATURES)
    return {k: (tf.sparse.to_dense(v).numpy() if isinstance(v, tf.SparseTensor) else v.numpy())
            for k, v in parsed.items()}


def test_tensorflow_parses_encoded_examples():
    for rec in make_records():
        parsed = tf_parse(records.encode_example(rec))
        np.testing.assert_array_equal(parsed["input_ids"], rec.input_ids)
        np.testing.assert_array_equal(parsed["loss_mask"], rec.loss_mask)
        assert (parsed["source"].decode(), parsed["task"].decode(), parsed["id"].decode()) == \
               (rec.source, rec.task, rec.id)


def test_decode_reads_what_tensorflow_writes():
    for rec in make_records(seed=1):
        ex = tf.train.Example(features=tf.train.Features(feature={
            "input_ids": tf.train.Feature(int64_list=tf.train.Int64List(value=rec.input_ids.tolist())),
            "loss_mask": tf.train.Feature(int64_list=tf.train.Int64List(value=rec.loss_mask.tolist())),
            "source": tf.train.Feature(bytes_list=tf.train.BytesList(value=[rec.source.encode()])),
            "task": tf.train.Feature(bytes_list=tf.train.BytesList(value=[rec.task.encode()])),
            "id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[rec.id.encode()])),
        }))
        back = records.decode_example(ex.SerializeToString())
        np.testing.assert_array_equal(back.input_ids, rec.input_ids)
        np.testing.assert_array_equal(back.loss_mask, rec.loss_mask)
        assert (back.source, back.task, back.id) == (rec.source, rec.task, rec.id)


def test_tfrecord_files_are_byte_identical_to_tensorflows_writer(tmp_path):
    payloads = [records.encode_example(r) for r in make_records(seed=2)] + [b""]
    ours = io.BytesIO()
    assert records.write_tfrecord(ours, payloads) == len(payloads)
    with tf.io.TFRecordWriter(str(tmp_path / "tf.tfrecord")) as w:
        for p in payloads:
            w.write(p)
    assert ours.getvalue() == (tmp_path / "tf.tfrecord").read_bytes()
    (tmp_path / "ours.tfrecord").write_bytes(ours.getvalue())
    read_by_tf = [bytes(x.numpy()) for x in tf.data.TFRecordDataset(str(tmp_path / "ours.tfrecord"))]
    assert read_by_tf == payloads


def test_index_and_random_access_and_corruption(tmp_path):
    payloads = [records.encode_example(r) for r in make_records(seed=3)]
    buf = io.BytesIO()
    records.write_tfrecord(buf, payloads)
    data = buf.getvalue()
    offsets = records.index_tfrecord(io.BytesIO(data))
    assert len(offsets) == len(payloads)
    for off, payload in zip(offsets, payloads):
        assert records.read_record_at(io.BytesIO(data), off) == payload
    assert list(records.iter_tfrecord(io.BytesIO(data))) == payloads
    flipped = bytearray(data)
    flipped[offsets[3] + 20] ^= 0xFF
    with pytest.raises(records.CorruptRecordError, match="checksum"):
        list(records.iter_tfrecord(io.BytesIO(bytes(flipped)), "x.tfrecord"))
    with pytest.raises(records.CorruptRecordError, match="truncated"):
        list(records.iter_tfrecord(io.BytesIO(data[:-3]), "x.tfrecord"))


def test_shard_names_round_trip():
    assert records.shard_filename("train", 3, 16) == "train-00003-of-00016.tfrecord"
    assert records.parse_shard_filename("gs://b/d/validation-00000-of-00001.tfrecord") == ("validation", 0, 1)
    assert records.parse_shard_filename("manifest.json") is None
    with pytest.raises(ValueError):
        records.shard_filename("test", 0, 1)
    with pytest.raises(ValueError):
        records.shard_filename("train", 2, 2)
