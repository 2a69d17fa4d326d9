"""The record schema shared by the writer (data_pipeline) and the reader (agentlm_jax.data).

One training example is one conversation, stored as a `tf.train.Example` inside a TFRecord file:

  input_ids  int64 list   the tokenized conversation, BOS/EOS included
  loss_mask  int64 list   0/1, same length; 1 marks a training target (unshifted)
  source     bytes        b"agent" or b"general"
  task       bytes        e.g. b"os", b"alfworld", or the general source's name
  id         bytes        the record's id in its source

TensorFlow is not needed at runtime: the `tf.train.Example` messages are declared here with the same
package, names and field numbers as TensorFlow's `example.proto`/`feature.proto` and serialized by
protobuf itself; the TFRecord framing (length, masked CRC32C) is the documented one. Tests check both
against TensorFlow's own parser.
"""

from __future__ import annotations

import dataclasses
import re
import struct
from typing import BinaryIO, Iterable, Iterator

import google_crc32c
import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

SPLITS = ("train", "validation")
SOURCES = ("agent", "general")
FEATURE_NAMES = ("input_ids", "loss_mask", "source", "task", "id")


@dataclasses.dataclass(frozen=True)
class Record:
    input_ids: np.ndarray  # int32 [T]
    loss_mask: np.ndarray  # int32 [T], 0/1
    source: str
    task: str
    id: str

    def __post_init__(self):
        if self.input_ids.shape != self.loss_mask.shape or self.input_ids.ndim != 1:
            raise ValueError(
                f"record {self.id!r}: input_ids {self.input_ids.shape} and loss_mask "
                f"{self.loss_mask.shape} must be 1-D and of equal length")


# --------------------------------------------------------------------------- tf.train.Example
def _build_example_classes():
    """Declares tensorflow.{Example,Features,Feature,BytesList,FloatList,Int64List} in a private pool."""
    f = descriptor_pb2.FileDescriptorProto(name="agentlm_tf_example.proto", package="tensorflow",
                                           syntax="proto3")
    L = descriptor_pb2.FieldDescriptorProto
    def msg(name, *fields, nested=()):
        m = f.message_type.add(name=name) if not nested else nested[0].nested_type.add(name=name)
        for fname, number, ftype, label, type_name, packed in fields:
            fd = m.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                fd.type_name = type_name
            if packed:
                fd.options.packed = True
        return m
    msg("BytesList", ("value", 1, L.TYPE_BYTES, L.LABEL_REPEATED, None, False))
    msg("FloatList", ("value", 1, L.TYPE_FLOAT, L.LABEL_REPEATED, None, True))
    msg("Int64List", ("value", 1, L.TYPE_INT64, L.LABEL_REPEATED, None, True))
    feature = msg("Feature",
                  ("bytes_list", 1, L.TYPE_MESSAGE, L.LABEL_OPTIONAL, ".tensorflow.BytesList", False),
                  ("float_list", 2, L.TYPE_MESSAGE, L.LABEL_OPTIONAL, ".tensorflow.FloatList", False),
                  ("int64_list", 3, L.TYPE_MESSAGE, L.LABEL_OPTIONAL, ".tensorflow.Int64List", False))
    feature.oneof_decl.add(name="kind")
    for field in feature.field:
        field.oneof_index = 0
    features = msg("Features",
                   ("feature", 1, L.TYPE_MESSAGE, L.LABEL_REPEATED, ".tensorflow.Features.FeatureEntry", False))
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=L.TYPE_STRING, label=L.LABEL_OPTIONAL)
    entry.field.add(name="value", number=2, type=L.TYPE_MESSAGE, label=L.LABEL_OPTIONAL,
                    type_name=".tensorflow.Feature")
    msg("Example", ("features", 1, L.TYPE_MESSAGE, L.LABEL_OPTIONAL, ".tensorflow.Features", False))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Example"))


Example = _build_example_classes()


def encode_example(record: Record) -> bytes:
    """Serializes a Record as a tf.train.Example; deterministic (map keys sorted)."""
    return encode_fields(np.asarray(record.input_ids, np.int64).tolist(),
                         np.asarray(record.loss_mask, np.int64).tolist(), record.source, record.task, record.id)


def encode_fields(input_ids: list[int], loss_mask: list[int], source: str, task: str, id: str) -> bytes:
    """`encode_example` from plain Python lists (the writer's fast path; same bytes)."""
    if len(input_ids) != len(loss_mask):
        raise ValueError(f"record {id!r}: {len(input_ids)} input_ids but {len(loss_mask)} loss_mask values")
    ex = Example()
    feats = ex.features.feature
    feats["input_ids"].int64_list.value.extend(input_ids)
    feats["loss_mask"].int64_list.value.extend(loss_mask)
    feats["source"].bytes_list.value.append(source.encode())
    feats["task"].bytes_list.value.append(task.encode())
    feats["id"].bytes_list.value.append(id.encode())
    return ex.SerializeToString(deterministic=True)


def decode_example(data: bytes) -> Record:
    ex = Example()
    ex.ParseFromString(data)
    feats = ex.features.feature
    missing = [k for k in FEATURE_NAMES if k not in feats]
    if missing:
        raise ValueError(f"tf.train.Example lacks features {missing}; is this an agentlm-jax record?")
    return Record(
        input_ids=np.array(feats["input_ids"].int64_list.value, dtype=np.int32),
        loss_mask=np.array(feats["loss_mask"].int64_list.value, dtype=np.int32),
        source=feats["source"].bytes_list.value[0].decode(),
        task=feats["task"].bytes_list.value[0].decode(),
        id=feats["id"].bytes_list.value[0].decode(),
    )


# --------------------------------------------------------------------------- TFRecord framing
_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")
_MASK_DELTA = 0xA282EAD8


def _masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frame_record(payload: bytes) -> bytes:
    """One TFRecord entry: uint64 length, masked crc32c(length), payload, masked crc32c(payload)."""
    length = struct.pack("<Q", len(payload))
    return length + struct.pack("<I", _masked_crc(length)) + payload + _FOOTER.pack(_masked_crc(payload))


def write_tfrecord(f: BinaryIO, payloads: Iterable[bytes]) -> int:
    """Writes framed payloads to an open binary file; returns the number written."""
    n = 0
    for payload in payloads:
        f.write(frame_record(payload))
        n += 1
    return n


class CorruptRecordError(ValueError):
    pass


def _read_header(f: BinaryIO, path: str, offset: int, verify: bool) -> int | None:
    head = f.read(_HEADER.size)
    if not head:
        return None
    if len(head) != _HEADER.size:
        raise CorruptRecordError(f"{path}: truncated record header at byte {offset}")
    length, length_crc = _HEADER.unpack(head)
    if verify and _masked_crc(head[:8]) != length_crc:
        raise CorruptRecordError(f"{path}: bad length checksum at byte {offset}")
    return length


def _read_payload(f: BinaryIO, length: int, path: str, offset: int, verify: bool) -> bytes:
    body = f.read(length + _FOOTER.size)
    if len(body) != length + _FOOTER.size:
        raise CorruptRecordError(f"{path}: truncated record at byte {offset}")
    payload = body[:length]
    if verify and _masked_crc(payload) != _FOOTER.unpack(body[length:])[0]:
        raise CorruptRecordError(f"{path}: bad data checksum in record at byte {offset}")
    return payload


def read_record_at(f: BinaryIO, offset: int, path: str = "<file>", verify: bool = True) -> bytes:
    """Reads the one record that starts at `offset` (as listed by index_tfrecord)."""
    f.seek(offset)
    length = _read_header(f, path, offset, verify)
    if length is None:
        raise CorruptRecordError(f"{path}: no record at byte {offset}")
    return _read_payload(f, length, path, offset, verify)


def iter_tfrecord(f: BinaryIO, path: str = "<file>", verify: bool = True) -> Iterator[bytes]:
    """Yields the payloads of a TFRecord file in order, checking the CRCs."""
    offset = f.tell()
    while (length := _read_header(f, path, offset, verify)) is not None:
        yield _read_payload(f, length, path, offset, verify)
        offset += _HEADER.size + length + _FOOTER.size


def index_tfrecord(f: BinaryIO, path: str = "<file>") -> list[int]:
    """Byte offsets of every record in a TFRecord file, reading only the 12-byte headers."""
    offsets, offset = [], 0
    f.seek(0)
    while True:
        length = _read_header(f, path, offset, verify=True)
        if length is None:
            return offsets
        offsets.append(offset)
        offset += _HEADER.size + length + _FOOTER.size
        f.seek(offset)


# --------------------------------------------------------------------------- file names
_SHARD_RE = re.compile(r"^(?P<split>[a-z]+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.tfrecord$")
MANIFEST_NAME = "manifest.json"
REJECTED_NAME = "rejected.jsonl"


def shard_filename(split: str, index: int, count: int) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} out of range for {count} shards")
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def parse_shard_filename(name: str) -> tuple[str, int, int] | None:
    """(split, index, count) for a shard file name, None for any other name."""
    m = _SHARD_RE.match(name.rsplit("/", 1)[-1])
    return (m["split"], int(m["index"]), int(m["count"])) if m else None
