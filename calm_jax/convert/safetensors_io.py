"""The safetensors format with numpy alone: memory-mapped reads and streamed writes.

A file is an 8-byte little-endian header length n, n bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}} and
the raw little-endian tensor bytes. Reading maps the file and returns views, so a
7 GB checkpoint costs no memory until a tensor is touched; writing takes the
header first (names, dtypes, shapes) and then the tensors one at a time, so the
caller never holds a second full copy. bfloat16 maps to ml_dtypes.bfloat16
(which numpy's own loader of the safetensors package cannot represent).
"""
import json
import mmap
import struct

import ml_dtypes
import numpy as np

from calm_jax.convert import ConvertError

DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_NAMES = {v: k for k, v in DTYPES.items()}
_ALIGN = 8           # header padded with spaces so that the data starts 8-byte aligned


class SafetensorsFile:
  """A memory-mapped .safetensors file: keys(), shape(key), get(key) -> numpy view."""

  def __init__(self, path):
    self.path = path
    self._file = open(path, "rb")
    try:
      (n,) = struct.unpack("<Q", self._file.read(8))
      header = json.loads(self._file.read(n))
    except (struct.error, ValueError) as e:
      self._file.close()
      raise ConvertError(f"{path} is not a safetensors file ({e}); re-save it with "
                         "save_pretrained(safe_serialization=True).") from e
    self.metadata = header.pop("__metadata__", None) or {}
    self._entries = header
    self._start = 8 + n
    self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if header else None

  def keys(self):
    return list(self._entries)

  def shape(self, key):
    return tuple(self._entries[key]["shape"])

  def get(self, key):
    """The tensor `key` as a read-only numpy view of the mapped file."""
    entry = self._entries[key]
    if entry["dtype"] not in DTYPES:
      raise ConvertError(f"{self.path}: tensor {key!r} has dtype {entry['dtype']}, which calm_jax "
                         f"does not read (supported: {sorted(DTYPES)}).")
    begin, end = entry["data_offsets"]
    dtype = DTYPES[entry["dtype"]]
    count = int(np.prod(entry["shape"], dtype=np.int64))
    if end - begin != count * dtype.itemsize:
      raise ConvertError(f"{self.path}: tensor {key!r} holds {end - begin} bytes, not the "
                         f"{count * dtype.itemsize} its shape {entry['shape']} needs; the file is "
                         "damaged.")
    if count == 0:
      return np.zeros(entry["shape"], dtype)
    return np.frombuffer(self._map, dtype, count, self._start + begin).reshape(entry["shape"])

  def close(self):
    if self._map is not None:
      try:
        self._map.close()
      except BufferError:
        pass          # views returned by get() are alive; the mapping is freed with them
    self._file.close()


def write(path, specs, tensors, metadata=None):
  """Writes a safetensors file from (name, shape, dtype) specs and a matching iterator of arrays.

  `tensors` yields the arrays in the order of `specs`, one at a time (a generator keeps
  memory at one tensor); each must have its spec's shape and dtype.
  """
  header, offset = {}, 0
  for name, shape, dtype in specs:
    size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": [int(s) for s in shape],
                    "data_offsets": [offset, offset + size]}
    offset += size
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-(8 + len(blob)) % _ALIGN)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    count = 0
    for (name, shape, dtype), array in zip(specs, tensors, strict=True):
      array = np.asarray(array)
      if tuple(array.shape) != tuple(shape) or array.dtype != np.dtype(dtype):
        raise ValueError(f"safetensors write {path}: {name} is {array.dtype}{list(array.shape)}, "
                         f"its spec says {np.dtype(dtype)}{list(shape)}.")
      f.write(np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False)
              .tobytes())
      count += 1
  return count
