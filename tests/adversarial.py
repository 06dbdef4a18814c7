"""A small adversarial corpus, generated on demand for ``tests/test_hostile.py``.

Nothing here is stored in the repository: each hostile or damaged input is built by a few lines below,
in milliseconds and in at most a few MB, from an ordinary image, manifest or archive. The corpus is what
a careless or hostile user would try (issue 17):

- images: a ``.nii.gz`` cut after its header or at 55 %, NaN and Inf in NIfTI and MetaImage files, a
  MetaImage header declaring 2^32 voxels per axis, and a gzip bomb (about 1 MB that inflates lazily to
  1 GiB behind a header declaring a tiny grid: built from one repeated deflate block, never allocated);
- YAML: a 600-byte alias bomb ("billion laughs") and collections nested 5,000 deep;
- archives: a bad CRC, a corrupt deflate stream, a file/folder clash, a 300-character name, sizes that
  lie in both directions, a 2,000-deep path, a directory that declares 60,000 members, and the usual
  traversal, absolute, NUL, link and look-alike names;
- names (:data:`HOSTILE_NAMES`): traversal, absolute, NUL, overlong and unicode look-alikes.

:func:`snapshot` lists everything under a folder, so a test can assert that a refused input wrote nothing.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np

from bench.imageio import Geometry, write_image

#: Grid of the corpus images: (z, y, x) voxels, spacing in mm (array order).
GRID = (6, 10, 12)
SPACING = (3.0, 0.9, 0.9)

#: Names a hostile dataset, manifest, upload or importer might carry, by what they try.
HOSTILE_NAMES: dict[str, str] = {
    "dotdot": "../x",
    "nested-dotdot": "a/../../b",
    "absolute": "/etc/passwd",
    "nul": "case\x00_001",
    "overlong": "c" * 300,
    "fullwidth-solidus": "a\uff0f..\uff0fb",  # ／ looks like /
    "cyrillic": "\u0441\u0430se_001",  # с and а are Cyrillic
    "rtl-override": "case\u202e100_",  # shows reversed
    "one-dot-leader": "\u2024\u2024/x",  # ․․ looks like ..
    "backslash": "a\\..\\b",
    "dots": "..",
    "space": "case 001",
    "empty": "",
}

BASE_MANIFEST = "name: {name}\nversion: '1.0'\nauthors: [A. Author]\ndescription: corpus entry\nlicence: MIT\n"


def geometry() -> Geometry:
    return Geometry(GRID, SPACING, origin=(-9.0, -4.0, -5.0))


def label_array() -> np.ndarray:
    """A binary label with a small box lesion."""
    label = np.zeros(GRID, np.uint8)
    label[2:4, 3:6, 3:7] = 1
    return label


def image_array(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(500, 1500, GRID).astype(np.float32)


def write(path: Path, array: np.ndarray) -> Path:
    """An ordinary image file (any suffix) on the corpus grid."""
    return write_image(array, geometry(), path)


# --------------------------------------------------------------------------------------------------
# Images


def truncated(source: Path, target: Path, fraction: float | None = 0.55) -> Path:
    """``source`` cut to ``fraction`` of its bytes, or (``None``) to its first gzip-compressed header only."""
    data = source.read_bytes()
    if fraction is None:
        header = zlib.compressobj(6, zlib.DEFLATED, 31)
        data = header.compress(gzip_inflated(source)[:352]) + header.flush(zlib.Z_SYNC_FLUSH)
    else:
        data = data[: int(len(data) * fraction)]
    target.write_bytes(data)
    return target


def gzip_inflated(path: Path) -> bytes:
    return zlib.decompress(path.read_bytes(), 31)


def nonfinite(path: Path, *, label: bool, values: tuple[float, ...] = (np.nan, np.inf, -np.inf)) -> Path:
    """A float image (or a float 0/1 label) with NaN and +-Inf on its first voxels (lesion voxels for a label)."""
    array = label_array().astype(np.float32) if label else image_array()
    where = np.argwhere(label_array() == 1)[: len(values)]
    for (z, y, x), value in zip(where, values):
        array[z, y, x] = value
    return write(path, array)


def overflowing_mha(path: Path, axis: int = 2**32) -> Path:
    """A MetaImage whose header declares ``axis`` voxels along each axis (and holds 100 bytes)."""
    header = (
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\nCompressedData = False\n"
        f"ElementSpacing = 0.9 0.9 3\nDimSize = {axis} {axis} {axis}\nElementType = MET_UCHAR\nElementDataFile = LOCAL\n"
    )
    path.write_bytes(header.encode() + b"\x00" * 100)
    return path


def gzip_bomb_nifti(path: Path, inflated_mib: int = 1024) -> Path:
    """A ``.nii.gz`` declaring the corpus grid (720 uint8 voxels) whose stream inflates to ``inflated_mib`` MiB.

    Built lazily: one full-flushed deflate block of 1 MiB of zeros (about 1 KB) is repeated, so making
    the file allocates about 1 MB; the gzip trailer is valid (CRC-32 and length of everything).
    """
    from bench.imageio import read_header

    write(path, label_array())
    header = gzip_inflated(path)[: read_header(path).offset]
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = deflate.compress(header) + deflate.flush(zlib.Z_FULL_FLUSH)
    zeros = bytes(1 << 20)
    block = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    assert deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH) == block, "a full flush makes blocks repeatable"
    crc = zlib.crc32(header)
    for _ in range(inflated_mib):
        crc = zlib.crc32(zeros, crc)
    size = (len(header) + (inflated_mib << 20)) & 0xFFFFFFFF
    with open(path, "wb") as out:
        out.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + head)
        for _ in range(inflated_mib):
            out.write(block)
        out.write(deflate.flush(zlib.Z_FINISH) + struct.pack("<II", crc, size))
    return path


# --------------------------------------------------------------------------------------------------
# YAML


def alias_bomb_yaml(name: str = "laughs") -> str:
    """A "billion laughs" manifest of about 600 bytes: nine levels of nine aliases (9^9 strings)."""
    lines = [BASE_MANIFEST.format(name=name) + "kind: python\nentry: predict.py:predict\noptions:", '  a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for previous, level in zip("abcdefgh", "bcdefghi"):
        lines.append(f"  {level}: &{level} [" + ",".join([f"*{previous}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def deep_yaml(name: str = "deep", depth: int = 5000) -> str:
    return BASE_MANIFEST.format(name=name) + "kind: python\nentry: predict.py:predict\noptions: {x: " + "[" * depth + "]" * depth + "}\n"


# --------------------------------------------------------------------------------------------------
# Archives

PYTHON_MANIFEST = BASE_MANIFEST.format(name="corpus") + "kind: python\nentry: predict.py:predict\n"
PREDICT_PY = "def predict(case):\n    raise NotImplementedError\n"


def zip_bytes(members: dict[str, bytes], *, compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A zip of ``members``; names keep any NUL byte (``zipfile`` would cut them there, so it is put back in the bytes)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for name, content in members.items():
            archive.writestr(name.replace("\x00", "\x01"), content)
    data = buffer.getvalue()
    for name in members:
        if "\x00" in name:
            data = data.replace(name.replace("\x00", "\x01").encode(), name.encode())
    return data


def submission_zip(extra: dict[str, bytes] | None = None, *, compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A valid python submission archive, plus ``extra`` members."""
    return zip_bytes({"submission.yaml": PYTHON_MANIFEST.encode(), "predict.py": PREDICT_PY.encode(), **(extra or {})}, compression=compression)


def _member_offsets(data: bytes, name: str) -> tuple[int, int, zipfile.ZipInfo]:
    """(local header offset, data offset, info) of member ``name``."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        info = archive.getinfo(name)
    start = info.header_offset
    name_length, extra_length = struct.unpack("<HH", data[start + 26 : start + 30])
    return start, start + 30 + name_length + extra_length, info


def _central_offset(data: bytes, name: str) -> int:
    at = data.find(b"PK\x01\x02")
    while at >= 0:
        name_length = struct.unpack("<H", data[at + 28 : at + 30])[0]
        if data[at + 46 : at + 46 + name_length] == name.encode():
            return at
        at = data.find(b"PK\x01\x02", at + 4)
    raise KeyError(name)


def broken_archive(kind: str) -> bytes:
    """One damaged or hostile submission archive, by ``kind`` (see :data:`ARCHIVE_KINDS`)."""
    payload = b"weights " * 512
    if kind == "bad-crc":
        data = bytearray(submission_zip({"weights.bin": payload}, compression=zipfile.ZIP_STORED))
        _, offset, _ = _member_offsets(bytes(data), "weights.bin")
        data[offset + 100] ^= 0xFF
        return bytes(data)
    if kind == "corrupt-deflate":
        data = bytearray(submission_zip({"weights.bin": payload}))
        _, offset, info = _member_offsets(bytes(data), "weights.bin")
        data[offset : offset + info.compress_size] = b"\xff" * info.compress_size
        return bytes(data)
    if kind in ("lying-size-small", "lying-size-large"):
        data = bytearray(submission_zip({"weights.bin": payload}, compression=zipfile.ZIP_STORED))
        local, _, info = _member_offsets(bytes(data), "weights.bin")
        central = _central_offset(bytes(data), "weights.bin")
        lie = info.file_size // 4 if kind == "lying-size-small" else info.file_size * 4
        struct.pack_into("<I", data, local + 22, lie)
        struct.pack_into("<I", data, central + 24, lie)
        if kind == "lying-size-large":  # a stored member's compressed size must agree to be read at all
            struct.pack_into("<I", data, local + 18, lie)
            struct.pack_into("<I", data, central + 20, lie)
        return bytes(data)
    if kind == "file-folder":
        return submission_zip({"model": b"a file", "model/weights.bin": payload})
    if kind == "long-name":
        return submission_zip({"n" * 300 + ".py": b"x = 1\n"})
    if kind == "deep-path":
        return submission_zip({"d/" * 2000 + "x.py": b"x = 1\n"})
    if kind == "many-members":
        data = bytearray(submission_zip())
        end = data.rfind(b"PK\x05\x06")
        struct.pack_into("<HH", data, end + 8, 60000, 60000)
        return bytes(data)
    if kind == "truncated":
        data = submission_zip({"weights.bin": os.urandom(4096)})
        return data[: len(data) // 2]
    if kind == "not-a-zip":
        return b"PK\x03\x04 this is not really a zip archive"
    if kind == "encrypted":
        data = bytearray(submission_zip({"weights.bin": payload}))
        local, _, _ = _member_offsets(bytes(data), "weights.bin")
        central = _central_offset(bytes(data), "weights.bin")
        struct.pack_into("<H", data, local + 6, 1)
        struct.pack_into("<H", data, central + 8, 1)
        return bytes(data)
    if kind == "symlink":
        buffer = io.BytesIO(submission_zip())
        with zipfile.ZipFile(buffer, "a") as archive:
            info = zipfile.ZipInfo("weights.bin")
            info.create_system = 3
            info.external_attr = (0o120777) << 16
            archive.writestr(info, "/etc/passwd")
        return buffer.getvalue()
    if kind == "duplicate":
        buffer = io.BytesIO(submission_zip())
        with warnings.catch_warnings(), zipfile.ZipFile(buffer, "a") as archive:
            warnings.simplefilter("ignore", UserWarning)  # zipfile warns of the duplicate it is asked to write
            archive.writestr("predict.py", "import os\n")
        return buffer.getvalue()
    names = {"traversal": "../../escaped.py", "absolute": "/tmp/escaped.py", "nul": "pre\x00dict.py",
             "fullwidth-solidus": "..\uff0f..\uff0fescaped.py", "backslash": "..\\..\\escaped.py"}
    return submission_zip({names[kind]: b"print('escaped')\n"})


ARCHIVE_KINDS: tuple[str, ...] = (
    "bad-crc", "corrupt-deflate", "lying-size-small", "lying-size-large", "file-folder", "long-name", "deep-path",
    "many-members", "truncated", "not-a-zip", "encrypted", "symlink", "duplicate", "traversal", "absolute", "nul",
    "fullwidth-solidus", "backslash",
)


# --------------------------------------------------------------------------------------------------
# Checking that nothing was written


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under ``root`` (links not followed) -> (mode, size, mtime_ns)."""
    found = {}
    for directory, folders, files in os.walk(root):
        for name in folders + files:
            path = Path(directory) / name
            info = path.lstat()
            found[path.relative_to(root).as_posix()] = (info.st_mode, info.st_size, info.st_mtime_ns)
    return found


# --------------------------------------------------------------------------------------------------
# Model files for verify --static


def onnx_model_bytes(*, external: str | None = None) -> bytes:
    """A tiny valid ONNX graph (one 1x1x1 convolution); with ``external``, its weight is stored at that location."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((1, 2, 1, 1, 1), np.float32), "w")
    if external is not None:
        weight.ClearField("raw_data")
        weight.data_location = TensorProto.EXTERNAL
        entry = weight.external_data.add()
        entry.key, entry.value = "location", external
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"])], "corpus",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 8, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 8, 8, 8])], [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def torchscript_like_zip(*, code: bool = True, pickles: bool = True) -> bytes:
    """A zip with the layout of ``torch.jit.save`` (not a working model: the static check reads only the layout)."""
    pickle = b"\x80\x02)." if pickles else b"garbage!"
    members = {"model/data.pkl": pickle, "model/constants.pkl": pickle, "model/version": b"3\n"}
    if code:
        members["model/code/__torch__/model.py"] = b"class Model(Module):\n  pass\n"
    return zip_bytes(members, compression=zipfile.ZIP_STORED)


MODEL_FILES: dict[str, tuple[str, bytes | None]] = {
    # kind-of-file: (submission kind, bytes; None = built by the test)
    "onnx-empty": ("onnx", b""),
    "onnx-garbage": ("onnx", b"\x08\x07garbage" * 64),
    "onnx-truncated": ("onnx", None),
    "onnx-external-outside": ("onnx", None),
    "torchscript-empty": ("torchscript", b""),
    "torchscript-garbage": ("torchscript", os.urandom(2048)),
    "torchscript-zip-of-garbage": ("torchscript", None),
    "torchscript-state-dict": ("torchscript", None),
    "torchscript-not-pickles": ("torchscript", None),
    "torchscript-bad-crc": ("torchscript", None),
}


def model_file(kind: str) -> bytes:
    """The bytes of one damaged model file of :data:`MODEL_FILES`."""
    fixed = MODEL_FILES[kind][1]
    if fixed is not None:
        return fixed
    if kind == "onnx-truncated":
        data = onnx_model_bytes()
        return data[: len(data) // 2]
    if kind == "onnx-external-outside":
        return onnx_model_bytes(external="../../../etc/passwd")
    if kind == "torchscript-zip-of-garbage":
        return zip_bytes({"model/a.bin": os.urandom(512), "b.txt": b"hello"})
    if kind == "torchscript-state-dict":
        return zip_bytes({"model/data.pkl": b"\x80\x02}q\x00.", "model/version": b"3\n", "model/data/0": bytes(64)})
    if kind == "torchscript-not-pickles":
        return torchscript_like_zip(pickles=False)
    data = bytearray(torchscript_like_zip())
    _, offset, _ = _member_offsets(bytes(data), "model/code/__torch__/model.py")
    data[offset + 3] ^= 0xFF
    return bytes(data)
