"""TensorBoard event files, written and read without TensorFlow.

TensorBoard reads `events.out.tfevents.*` files: a TFRecord stream (uint64 length, masked CRC-32C
of the length, payload, masked CRC-32C of the payload) of `Event` protobufs, the first carrying
`file_version = "brain.Event:2"`. Scalars, histograms and text need only a few messages, so they
are encoded by hand rather than pulling in TensorFlow or protobuf (field numbers from
tensorboard/compat/proto: event, summary, histogram, tensor, tensor_shape):

    Event           { double wall_time = 1; int64 step = 2; string file_version = 3;
                      Summary summary = 5; }
    Summary         { repeated Value value = 1; }
    Value           { string tag = 1; float simple_value = 2; HistogramProto histo = 5;
                      TensorProto tensor = 8; SummaryMetadata metadata = 9; }
    HistogramProto  { double min = 1; double max = 2; double num = 3; double sum = 4;
                      double sum_squares = 5; repeated double bucket_limit = 6 [packed];
                      repeated double bucket = 7 [packed]; }
    SummaryMetadata { PluginData plugin_data = 1; }   PluginData { string plugin_name = 1; }
    TensorProto     { DataType dtype = 1; TensorShapeProto tensor_shape = 2;
                      repeated bytes string_val = 8; }

A histogram's bucket i counts the values from bucket_limit[i-1] (`min` for the first) to
bucket_limit[i] (the last limit is `max`): how TensorBoard's data_compat reads it. Text
is TensorBoard's text-plugin summary: a scalar DT_STRING tensor (Markdown) with plugin "text".

The readers exist so a run's files can be checked without TensorBoard: read_tfrecords verifies
every CRC, decode_event parses the scalar messages, read_tensorboard_scalars gathers a run. Files
are read through `paths.as_path`, so `gs://` and `file://` run directories work too.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from grpo_jax import paths

FILE_VERSION = "brain.Event:2"  # the first event of every file; TensorBoard checks it
HISTOGRAM_BUCKETS = 30           # tf.summary.histogram's default
_DT_STRING = 7                   # tensorflow DataType enum
_TEXT_PLUGIN = "text"


# ----------------------------------------------------------------------------------------------
# CRC-32C (Castagnoli), as TFRecord framing needs it.


def _crc32c_table() -> tuple[int, ...]:
  """Byte table of the reflected Castagnoli polynomial 0x82F63B78."""
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C of `data` (pure Python, table-driven); crc32c(b"123456789") == 0xE3069283."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """TFRecord's masked CRC: rotate right by 15 bits and add a constant (mod 2^32)."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(payload: bytes) -> bytes:
  """One TFRecord: uint64 length, masked CRC of the length, payload, masked CRC of the payload."""
  length = struct.pack("<Q", len(payload))
  return (length + struct.pack("<I", masked_crc32c(length)) + payload
          + struct.pack("<I", masked_crc32c(payload)))


def read_tfrecords(path: str | os.PathLike) -> list[bytes]:
  """All payloads of a TFRecord file; raises ValueError naming the file and offset on a bad CRC
  or a truncated record."""
  data = paths.as_path(path).read_bytes()
  payloads, pos = [], 0
  while pos < len(data):
    if pos + 12 > len(data):
      raise ValueError(f"{path}: truncated record header at byte {pos}")
    length_bytes = data[pos:pos + 8]
    (length,) = struct.unpack("<Q", length_bytes)
    (length_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
    if length_crc != masked_crc32c(length_bytes):
      raise ValueError(f"{path}: length CRC mismatch at byte {pos}")
    end = pos + 12 + length
    if end + 4 > len(data):
      raise ValueError(f"{path}: truncated record at byte {pos}")
    payload = data[pos + 12:end]
    (payload_crc,) = struct.unpack("<I", data[end:end + 4])
    if payload_crc != masked_crc32c(payload):
      raise ValueError(f"{path}: payload CRC mismatch at byte {pos}")
    payloads.append(payload)
    pos = end + 4
  return payloads


# ----------------------------------------------------------------------------------------------
# The few protobuf messages of a TensorBoard event file.


def _varint(value: int) -> bytes:
  """Base-128 varint; negative int64 values as their 64-bit two's complement (10 bytes)."""
  value &= 0xFFFFFFFFFFFFFFFF
  out = bytearray()
  while True:
    bits = value & 0x7F
    value >>= 7
    if value:
      out.append(bits | 0x80)
    else:
      out.append(bits)
      return bytes(out)


def _field(number: int, wire_type: int) -> bytes:
  """A field's key: its number and wire type packed into one varint."""
  return _varint((number << 3) | wire_type)


def _length_delimited(number: int, payload: bytes) -> bytes:
  """Wire type 2 (strings, bytes, nested messages): key, byte length, payload."""
  return _field(number, 2) + _varint(len(payload)) + payload


def _double(number: int, value: float) -> bytes:
  """Wire type 1: a little-endian float64."""
  return _field(number, 1) + struct.pack("<d", value)


def _packed_doubles(number: int, values: np.ndarray) -> bytes:
  """A packed `repeated double` (proto3's default encoding): one length-delimited run."""
  return _length_delimited(number, np.asarray(values, "<f8").tobytes())


def histogram_proto(values: Any, buckets: int = HISTOGRAM_BUCKETS) -> bytes | None:
  """Serialised `HistogramProto` of the finite entries of `values` (any shape), in `buckets`
  equal-width buckets from min to max (one bucket when all are equal); None when none is finite
  (a histogram of nothing would break TensorBoard's min/max)."""
  x = np.asarray(values, np.float64).ravel()
  x = x[np.isfinite(x)]
  if not x.size:
    return None
  lo, hi = float(x.min()), float(x.max())
  if lo == hi:
    limits, counts = np.array([hi]), np.array([x.size])
  else:
    counts, edges = np.histogram(x, bins=buckets, range=(lo, hi))
    limits = edges[1:]
  return (_double(1, lo) + _double(2, hi) + _double(3, float(x.size)) + _double(4, float(x.sum()))
          + _double(5, float(np.square(x).sum())) + _packed_doubles(6, limits)
          + _packed_doubles(7, counts.astype(np.float64)))


def text_tensor(text: str) -> bytes:
  """Serialised scalar DT_STRING `TensorProto` holding `text` (UTF-8)."""
  return _field(1, 0) + _varint(_DT_STRING) + _length_delimited(2, b"") + _length_delimited(
      8, text.encode("utf-8"))


def _value(tag: str, body: bytes) -> bytes:
  """One `Summary.Value`: the tag, then the already encoded value fields."""
  return _length_delimited(1, _length_delimited(1, tag.encode()) + body)


def encode_event(wall_time: float, step: int = 0, *, file_version: str | None = None,
                 scalars: Mapping[str, float] | None = None,
                 histograms: Mapping[str, Any] | None = None,
                 texts: Mapping[str, str] | None = None) -> bytes:
  """Serialised `Event` with `file_version`, or a `Summary` of scalar values, histograms of
  arrays (tags whose arrays have no finite entry are left out) and text (Markdown) values."""
  out = _field(1, 1) + struct.pack("<d", wall_time) + _field(2, 0) + _varint(step)
  if file_version is not None:
    out += _length_delimited(3, file_version.encode())
  values = [_value(tag, _field(2, 5) + struct.pack("<f", value))
            for tag, value in (scalars or {}).items()]
  for tag, array in (histograms or {}).items():
    histo = histogram_proto(array)
    if histo is not None:
      values.append(_value(tag, _length_delimited(5, histo)))
  text_metadata = _length_delimited(9, _length_delimited(1, _length_delimited(
      1, _TEXT_PLUGIN.encode())))
  values += [_value(tag, text_metadata + _length_delimited(8, text_tensor(text)))
             for tag, text in (texts or {}).items()]
  if values:
    out += _length_delimited(5, b"".join(values))
  return out


def _parse_fields(data: bytes) -> list[tuple[int, int, Any]]:
  """Generic protobuf wire parse: [(field number, wire type, int | bytes)]."""
  fields, pos = [], 0
  while pos < len(data):
    key, pos = _read_varint(data, pos)
    number, wire_type = key >> 3, key & 7
    if wire_type == 0:
      value, pos = _read_varint(data, pos)
    elif wire_type == 1:
      value, pos = data[pos:pos + 8], pos + 8
    elif wire_type == 2:
      length, pos = _read_varint(data, pos)
      value, pos = data[pos:pos + length], pos + length
    elif wire_type == 5:
      value, pos = data[pos:pos + 4], pos + 4
    else:
      raise ValueError(f"unsupported protobuf wire type {wire_type}")
    fields.append((number, wire_type, value))
  return fields


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
  """(value, position after it) of the varint at `pos`; the inverse of `_varint`."""
  result, shift = 0, 0
  while True:
    byte = data[pos]
    pos += 1
    result |= (byte & 0x7F) << shift
    shift += 7
    if not byte & 0x80:
      return result, pos


def decode_event(payload: bytes) -> dict:
  """`Event` bytes -> {"wall_time", "step", "file_version" (or None), "scalars": {tag: value}}."""
  event = {"wall_time": 0.0, "step": 0, "file_version": None, "scalars": {}}
  for number, _, value in _parse_fields(payload):
    if number == 1:
      event["wall_time"] = struct.unpack("<d", value)[0]
    elif number == 2:
      event["step"] = value - (1 << 64) if value >= 1 << 63 else value
    elif number == 3:
      event["file_version"] = value.decode()
    elif number == 5:
      for v_number, _, v_value in _parse_fields(value):
        if v_number != 1:
          continue
        tag, simple = None, None
        for f_number, _, f_value in _parse_fields(v_value):
          if f_number == 1:
            tag = f_value.decode()
          elif f_number == 2:
            simple = struct.unpack("<f", f_value)[0]
        if tag is not None and simple is not None:
          event["scalars"][tag] = simple
  return event


def event_file_name() -> str:
  """A fresh `events.out.tfevents.<time>.<host>.<pid>` name: TensorBoard finds event files by
  the `tfevents` infix, and the time prefix keeps a run's files in creation order."""
  return f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}"


def read_tensorboard_scalars(path: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value)]} from one event file or every `*tfevents*` file under a directory
  (in name order, i.e. creation order), verifying every CRC."""
  path = paths.as_path(path)
  if path.is_dir():
    files = sorted((root / name for root, _, names in path.walk() for name in names
                    if "tfevents" in name), key=str)
  else:
    files = [path]
  scalars: dict[str, list[tuple[int, float]]] = {}
  for file in files:
    for payload in read_tfrecords(file):
      event = decode_event(payload)
      for tag, value in event["scalars"].items():
        scalars.setdefault(tag, []).append((event["step"], value))
  return scalars
