"""Reading and writing medical images with their geometry: the one image reader of the benchmark.

Every stage of the benchmark exchanges images as a numpy array in **array-axis order** (z, y, x for
3-D volumes, as SimpleITK's ``GetArrayFromImage`` returns them) together with a :class:`Geometry`
whose ``spacing`` and ``origin`` are given in the *same* array-axis order. SimpleITK's own
``GetSpacing()`` is in physical x, y, z order; converting exactly once here is what keeps a
0.9 x 0.9 x 2.0 mm scan from being scored as if it had 2.0 mm in-plane pixels (the BONBID-HIE 2023
evaluation script mixes the two orders).

**Reading is bounded and strict.** Images come from other people (uploads, submissions, imports), so
:func:`read_image` and :func:`read_geometry` follow one contract:

1. The file's own header is parsed here, without SimpleITK (NIfTI-1 binary header; MetaImage and NRRD
   text headers of at most :data:`MAX_HEADER_BYTES`). The declared grid must be 3-D, non-empty, at most
   :data:`MAX_AXIS_LENGTH` voxels per axis and :data:`MAX_VOXELS` in all, with finite spacing; nothing
   is allocated or decompressed before that.
2. SimpleITK reads only the header (``ReadImageInformation``) for the geometry, so the origin and
   direction conventions are exactly SimpleITK's; its spacing must be finite and positive.
3. The voxels are decoded here from the file's bytes. A compressed stream is inflated with a bound (the
   declared size plus one byte): it must end with a valid checksum after exactly the declared bytes,
   so a truncated file is an error (SimpleITK zero-fills it) and a gzip bomb stops at the bound.
4. NaN and Inf are seen as stored (SimpleITK's NIfTI reader turns them into 0) and, unless the caller
   passes ``finite=False``, refused with the count of bad voxels.

Every failure is one :class:`ImageError` line that names the file. Supported files: ``.nii``/``.nii.gz``
(NIfTI-1), ``.mha``/``.mhd`` (MetaImage, binary, optionally zlib-compressed, data inline or in one file
beside the ``.mhd``), ``.nrrd`` (attached raw or gzip data).

Writes are atomic: the image is written to a temporary file in the target folder and renamed, so a
crash never leaves a half-written file where a reader expects a complete one.
"""

from __future__ import annotations

import functools
import gzip
import math
import os
import re
import struct
import tempfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator, Literal

import numpy as np

#: File suffixes the benchmark reads and writes, longest first so ``.nii.gz`` wins over ``.gz``.
IMAGE_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")

#: Most voxels one image may declare: 2^28 (268 M). A neonatal MRI is about 10^6-10^7 voxels and even a
#: 0.5 mm isotropic whole-head grid is under 2^25, so this leaves an 8-fold margin while bounding one
#: read to 1 GiB of float32 (2 GiB at float64): a hostile header cannot make a reader allocate more.
MAX_VOXELS = 2**28
#: Longest axis, in voxels: no scanner grid comes near it, and it keeps each dimension far from int32.
MAX_AXIS_LENGTH = 8192
#: Longest text header (MetaImage, NRRD) read before giving up: real ones are under 1 KiB.
MAX_HEADER_BYTES = 64 * 1024
#: Largest NIfTI ``vox_offset`` (header plus extensions such as dcm2niix's JSON, typically under 64 KiB).
MAX_NIFTI_OFFSET = 16 * 1024**2

_CHUNK = 1 << 20
Compression = Literal["none", "gzip", "zlib"]


class ImageError(ValueError):
    """An image file could not be read or does not match what was expected."""


@dataclass(frozen=True)
class Geometry:
    """Where a voxel grid lies in physical space.

    ``spacing`` and ``origin`` are in array-axis order (for 3-D: z, y, x), in millimetres.
    ``direction`` is the row-major 3x3 direction cosine matrix exactly as SimpleITK stores it
    (columns are the physical directions of the x, y, z index axes).
    """

    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...] = field(default=(0.0, 0.0, 0.0))
    direction: tuple[float, ...] = field(default=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres (1 ml = 1000 mm^3)."""
        return float(np.prod(self.spacing)) / 1000.0

    def differences(self, other: "Geometry", *, atol: float = 1e-3) -> list[str]:
        """Human-readable list of what differs between two geometries (empty when they agree).

        Tolerances are absolute in mm (spacing, origin) and in cosine units (direction); headers written
        by different tools routinely differ in the 6th decimal, which is not a real mismatch.
        """
        problems: list[str] = []
        if tuple(self.shape) != tuple(other.shape):
            problems.append(f"shape {tuple(self.shape)} != {tuple(other.shape)}")
        for name in ("spacing", "origin", "direction"):
            mine, theirs = np.asarray(getattr(self, name)), np.asarray(getattr(other, name))
            if mine.shape != theirs.shape or not np.allclose(mine, theirs, atol=atol, rtol=0):
                problems.append(f"{name} {_fmt(mine)} != {_fmt(theirs)}")
        return problems


def _fmt(values: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in np.ravel(values)) + ")"


def strip_image_suffix(path: str | Path) -> str | None:
    """Return the file name without its image suffix, or ``None`` if it is not an image file."""
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def _image_suffix(path: Path) -> str | None:
    return next((s for s in IMAGE_SUFFIXES if path.name.lower().endswith(s)), None)


# --------------------------------------------------------------------------------------------------
# Reading: the public functions


def read_image(path: str | Path, *, finite: bool = True) -> tuple[np.ndarray, Geometry]:
    """Read an image file into ``(array, geometry)`` with array-axis-order geometry.

    The header is checked before any voxel is read (see the module docstring). With ``finite`` (the
    default: images, labels and masks must be finite) a float image holding NaN or Inf is refused with
    the count of such voxels; ``finite=False`` returns them exactly as stored.

    Raises :class:`ImageError` naming the file when it is missing, unreadable, truncated, over the
    limits, not 3-D scalar, or not finite.
    """
    path = Path(path)
    header = read_header(path)
    geometry, dtype = _sitk_information(path, header)
    flat = _read_voxels(path, header)
    array = _decode(flat, header, dtype).reshape(geometry.shape)
    if finite and array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        raise ImageError(f"{path}: {bad} voxels are NaN or infinite (write finite values only, e.g. np.nan_to_num before saving)")
    return array, geometry


def read_geometry(path: str | Path) -> Geometry:
    """Read only the header of an image file (fast: no voxel data is loaded), checked as :func:`read_image` does."""
    path = Path(path)
    return _sitk_information(path, read_header(path))[0]


@dataclass(frozen=True)
class Header:
    """What an image file's own header declares, parsed without SimpleITK.

    ``shape`` is in file order (x fastest, as the header lists it), trailing singleton axes beyond the
    third dropped. ``dtype`` is the stored element type with its byte order. The voxels are ``nbytes``
    bytes at ``offset`` of ``data_file`` (compressed there when ``compression`` is not ``none``; for
    NIfTI-1 ``.nii.gz`` the offset counts in the decompressed stream). ``scale`` is NIfTI's
    ``(scl_slope, scl_inter)`` when it applies, as ITK applies it.
    """

    format: Literal["nifti1", "metaimage", "nrrd"]
    shape: tuple[int, ...]
    dtype: np.dtype
    components: int
    data_file: Path
    offset: int
    compression: Compression
    spacing: tuple[float, ...] = ()
    scale: tuple[float, float] | None = None

    @property
    def n_voxels(self) -> int:
        return math.prod(self.shape) * self.components

    @property
    def nbytes(self) -> int:
        return self.n_voxels * self.dtype.itemsize


def read_header(path: str | Path) -> Header:
    """Parse and check the header of an image file (cheap: reads at most :data:`MAX_HEADER_BYTES`).

    Raises :class:`ImageError` naming the file for a missing, unsupported or unreadable file and for a
    header that declares a grid over the limits (:data:`MAX_VOXELS`, :data:`MAX_AXIS_LENGTH`) or
    non-finite spacing.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: file not found")
    suffix = _image_suffix(path)
    parsers = {".nii.gz": _nifti_header, ".nii": _nifti_header, ".mha": _meta_header, ".mhd": _meta_header, ".nrrd": _nrrd_header}
    if suffix is None:
        raise ImageError(f"{path}: unsupported image suffix (use one of {', '.join(IMAGE_SUFFIXES)})")
    if path.stat().st_size == 0:
        raise _unreadable(path, "the file is empty")
    try:
        header = parsers[suffix](path)
    except (OSError, EOFError, zlib.error, struct.error, UnicodeDecodeError, ValueError) as exc:
        if isinstance(exc, ImageError):
            raise
        raise ImageError(f"{path}: cannot be read as an image ({_reason(exc)})") from exc
    _check_declared_grid(path, header)
    return header


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


def _unreadable(path: Path, reason: str) -> ImageError:
    return ImageError(f"{path}: cannot be read as an image ({reason})")


def _check_declared_grid(path: Path, header: Header) -> None:
    """Refuse an empty, oversized or non-finite grid before anything is allocated."""
    shape = header.shape
    if len(shape) < 3:
        raise ImageError(f"{path}: is {len(shape)}-D, expected a 3-D volume")
    if any(n < 1 for n in shape):
        raise ImageError(f"{path}: header declares an empty grid {' x '.join(map(str, shape))}")
    if max(shape) > MAX_AXIS_LENGTH or header.n_voxels > MAX_VOXELS:
        raise ImageError(f"{path}: header declares {' x '.join(map(str, shape))} voxels, over the limit of {MAX_AXIS_LENGTH} per axis "
                         f"and {MAX_VOXELS:,} in all (a damaged or hostile header; re-save the image)")
    if header.components != 1:
        raise ImageError(f"{path}: has {header.components} components per voxel, expected a scalar image")
    if any(not math.isfinite(s) or s == 0 for s in header.spacing):
        raise ImageError(f"{path}: header spacing {header.spacing} is not finite and non-zero (re-save the image with its voxel size)")


# --------------------------------------------------------------------------------------------------
# Header parsers (one per format)

#: NIfTI-1 ``datatype`` code -> stored numpy type (scalar types only; ITK reads these as they are).
_NIFTI_TYPES: dict[int, str] = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4", 1024: "i8", 1280: "u8"}
_NIFTI_MULTI: dict[int, int] = {128: 3, 2304: 4, 32: 2, 1792: 2}  # RGB, RGBA, complex: several values per voxel


def _nifti_header(path: Path) -> Header:
    compressed = path.name.lower().endswith(".gz")
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as handle:
            raw = handle.read(352)
    except EOFError:
        raw = b""  # the gzip stream ends inside the header
    if len(raw) >= 4 and struct.unpack("<i", raw[:4])[0] in (540, 0x1C020000):
        raise ImageError(f"{path}: is NIfTI-2, which SimpleITK cannot read (save it as NIfTI-1, e.g. nibabel.Nifti1Image)")
    if len(raw) < 348:
        raise ImageError(f"{path}: truncated: the file ends inside its NIfTI header (the file is damaged or was cut short; copy or export it again)")
    endian = "<" if struct.unpack("<i", raw[:4])[0] == 348 else ">"
    if struct.unpack(endian + "i", raw[:4])[0] != 348 or raw[344:348] != b"n+1\x00":
        raise _unreadable(path, "not a single-file NIfTI-1 header (sizeof_hdr 348, magic 'n+1')")
    dim = struct.unpack(endian + "8h", raw[40:56])
    datatype = struct.unpack(endian + "h", raw[70:72])[0]
    pixdim = struct.unpack(endian + "8f", raw[76:108])
    vox_offset, slope, inter = struct.unpack(endian + "3f", raw[108:120])
    if not 1 <= dim[0] <= 7:
        raise _unreadable(path, f"dim[0] = {dim[0]} is not a number of axes in 1..7")
    sizes = list(dim[1 : dim[0] + 1])
    while len(sizes) > 3 and sizes[-1] == 1:
        sizes.pop()  # ITK drops trailing singleton axes: (x, y, z, 1) is 3-D
    if datatype in _NIFTI_MULTI:
        raise ImageError(f"{path}: has {_NIFTI_MULTI[datatype]} components per voxel (NIfTI datatype {datatype}), expected a scalar image")
    if datatype not in _NIFTI_TYPES:
        raise _unreadable(path, f"unsupported NIfTI datatype {datatype}")
    if not (math.isfinite(vox_offset) and 348 <= vox_offset <= MAX_NIFTI_OFFSET and vox_offset == int(vox_offset)):
        raise _unreadable(path, f"vox_offset {vox_offset} is not a byte offset after the header (at most {MAX_NIFTI_OFFSET:,})")
    # As ITK: a zero or non-finite slope means "not scaled", a non-finite intercept counts as 0.
    inter = inter if math.isfinite(inter) else 0.0
    scaled = math.isfinite(slope) and slope != 0 and (slope != 1 or inter != 0)
    scale = (float(slope), float(inter)) if scaled else None
    return Header("nifti1", tuple(int(s) for s in sizes), np.dtype(endian + _NIFTI_TYPES[datatype]), 1, path, int(vox_offset),
                  "gzip" if compressed else "none", tuple(float(p) for p in pixdim[1:4]), scale)


def _text_header(path: Path, last_key: re.Pattern[bytes] | None) -> tuple[bytes, int]:
    """The header bytes of a text-header format and the offset just after it (after ``last_key``'s
    line for MetaImage, after the first blank line for NRRD)."""
    with open(path, "rb") as handle:
        head = handle.read(MAX_HEADER_BYTES)
    if b"\x00" in head.split(b"\n", 1)[0]:
        raise _unreadable(path, "binary data where a text header was expected")
    if last_key is not None:
        match = last_key.search(head)
        end = match.end() if match else -1
    else:
        match = re.search(rb"\r?\n\r?\n", head)
        end = match.end() if match else -1
    if end < 0:
        what = "an ElementDataFile line" if last_key is not None else "a blank line ending the header"
        raise _unreadable(path, f"no {what} in the first {MAX_HEADER_BYTES // 1024} KiB")
    return head[:end], end


#: MetaImage ``ElementType`` -> stored numpy type (MetaIO's sizes: MET_LONG is 4 bytes).
_META_TYPES: dict[str, str] = {
    "MET_CHAR": "i1", "MET_UCHAR": "u1", "MET_SHORT": "i2", "MET_USHORT": "u2", "MET_INT": "i4", "MET_UINT": "u4",
    "MET_LONG": "i4", "MET_ULONG": "u4", "MET_LONG_LONG": "i8", "MET_ULONG_LONG": "u8", "MET_FLOAT": "f4", "MET_DOUBLE": "f8",
}
_META_LAST = re.compile(rb"^[ \t]*ElementDataFile[ \t]*=[^\r\n]*(\r?\n|$)", re.MULTILINE)
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+-]{0,254}$")


def _meta_header(path: Path) -> Header:
    text, end = _text_header(path, _META_LAST)
    fields: dict[str, str] = {}
    for line in text.decode("latin-1").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip().lower()] = value.strip()
    ndims = _ints(path, fields, "ndims", 1)[0]
    sizes = _ints(path, fields, "dimsize", ndims)
    type_name = fields.get("elementtype", "")
    if type_name not in _META_TYPES:
        raise _unreadable(path, f"unsupported ElementType {type_name!r}")
    if fields.get("binarydata", "True").lower() != "true":
        raise _unreadable(path, "ASCII MetaImage data is not supported (write BinaryData = True)")
    msb = fields.get("binarydatabyteordermsb", fields.get("elementbyteordermsb", "False")).lower() == "true"
    components = _ints(path, fields, "elementnumberofchannels", 1)[0] if "elementnumberofchannels" in fields else 1
    spacing = fields.get("elementspacing", fields.get("elementsize", ""))
    compression: Compression = "zlib" if fields.get("compresseddata", "False").lower() == "true" else "none"
    data_name = fields.get("elementdatafile", "")
    if data_name == "LOCAL":
        data_file, offset = path, end
    else:
        data_file = _beside(path, data_name)
        offset = _ints(path, fields, "headersize", 1)[0] if "headersize" in fields else 0
    while len(sizes) > 3 and sizes[-1] == 1:
        sizes.pop()
    floats = tuple(float(v) for v in spacing.split()[:3]) if spacing else ()
    return Header("metaimage", tuple(sizes), np.dtype((">" if msb else "<") + _META_TYPES[type_name]), components,
                  data_file, offset, compression, floats)


def _ints(path: Path, fields: dict[str, str], key: str, count: int) -> list[int]:
    values = fields.get(key, "").split()
    try:
        numbers = [int(v) for v in values]
    except ValueError:
        numbers = []
    if len(numbers) != count or (key != "headersize" and len(values) != count):
        raise _unreadable(path, f"header field {key!r} must hold {count} whole number(s), found {fields.get(key, '(none)')!r}")
    return numbers


def _beside(path: Path, name: str) -> Path:
    """The data file a detached header names: a plain file name in the header's own folder, nothing else."""
    if not _PLAIN_NAME.match(name) or name in (".", ".."):
        raise ImageError(f"{path}: data file {name!r} must be a plain file name beside the header "
                         "(no folders, lists or patterns); save the image as a single .mha or .nii.gz")
    data_file = path.parent / name
    if not data_file.is_file():
        raise ImageError(f"{data_file}: data file named by {path.name} not found")
    return data_file


_NRRD_TYPES: dict[str, str] = {}
for _numpy_type, _names in {
    "i1": ("signed char", "int8", "int8_t"),
    "u1": ("uchar", "unsigned char", "uint8", "uint8_t"),
    "i2": ("short", "short int", "signed short", "signed short int", "int16", "int16_t"),
    "u2": ("ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"),
    "i4": ("int", "signed int", "int32", "int32_t"),
    "u4": ("uint", "unsigned int", "uint32", "uint32_t"),
    "i8": ("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64", "int64_t"),
    "u8": ("ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t"),
    "f4": ("float",),
    "f8": ("double",),
}.items():
    _NRRD_TYPES.update(dict.fromkeys(_names, _numpy_type))


def _nrrd_header(path: Path) -> Header:
    text, end = _text_header(path, None)
    lines = text.decode("latin-1").splitlines()
    if not lines or not lines[0].startswith("NRRD000"):
        raise _unreadable(path, "no NRRD magic line")
    fields = {}
    for line in lines[1:]:
        key, sep, value = line.partition(":")
        if sep and not line.startswith("#") and not value.startswith("="):
            fields[key.strip().lower()] = value.strip()
    ndims = _ints(path, fields, "dimension", 1)[0]
    sizes = _ints(path, fields, "sizes", ndims)
    type_name = fields.get("type", "")
    if type_name not in _NRRD_TYPES:
        raise _unreadable(path, f"unsupported NRRD type {type_name!r}")
    encoding = fields.get("encoding", "")
    if encoding not in ("raw", "gzip", "gz"):
        raise _unreadable(path, f"NRRD encoding {encoding!r} is not supported (use raw or gzip)")
    if "data file" in fields or "datafile" in fields or fields.get("line skip", "0") != "0" or fields.get("byte skip", "0") != "0":
        raise ImageError(f"{path}: detached or skipped NRRD data is not supported (save the image as a single .nrrd or .nii.gz)")
    endian = ">" if fields.get("endian", "little") == "big" else "<"
    spacing = tuple(float(v) for v in fields.get("spacings", "").split()[:3] if v.lower() != "nan")
    while len(sizes) > 3 and sizes[-1] == 1:
        sizes.pop()
    return Header("nrrd", tuple(sizes), np.dtype(endian + _NRRD_TYPES[type_name]), 1, path, end,
                  "gzip" if encoding in ("gzip", "gz") else "none", spacing)


# --------------------------------------------------------------------------------------------------
# Geometry (SimpleITK, header only) and voxels (here, bounded)

_SITK_IO = {"nifti1": "NiftiImageIO", "metaimage": "MetaImageIO", "nrrd": "NrrdImageIO"}


def _sitk_information(path: Path, header: Header) -> tuple[Geometry, np.dtype]:
    """Geometry and output pixel type as SimpleITK reads them from the header (no voxel data)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.SetImageIO(_SITK_IO[header.format])
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:  # SimpleITK reports every IO failure as RuntimeError
        lines = str(exc).strip().splitlines()
        raise _unreadable(path, lines[-1].strip() if lines else "unreadable header") from exc
    size = reader.GetSize()
    if len(size) != 3:
        raise ImageError(f"{path}: is {len(size)}-D, expected a 3-D volume")
    if reader.GetNumberOfComponents() != 1:
        raise ImageError(f"{path}: has {reader.GetNumberOfComponents()} components per voxel, expected a scalar image")
    # "+ 0.0" turns -0.0 into 0.0: ITK's header-only read reports some zero cosines as -0.0.
    geometry = Geometry(
        shape=tuple(int(s) for s in reversed(size)),
        spacing=tuple(float(s) for s in reversed(reader.GetSpacing())),
        origin=tuple(float(o) + 0.0 for o in reversed(reader.GetOrigin())),
        direction=tuple(float(d) + 0.0 for d in reader.GetDirection()),
    )
    if tuple(reversed(geometry.shape)) != header.shape:
        raise _unreadable(path, f"SimpleITK reads the grid as {tuple(size)}, the header declares {header.shape}")
    if not all(math.isfinite(s) and s > 0 for s in geometry.spacing):
        raise ImageError(f"{path}: spacing {geometry.spacing} is not finite and positive (re-save the image with its voxel size)")
    if not all(math.isfinite(v) for v in (*geometry.origin, *geometry.direction)):
        raise ImageError(f"{path}: origin or direction is not finite (re-save the image with a valid header)")
    return geometry, _sitk_dtypes().get(reader.GetPixelID(), header.dtype.newbyteorder("="))


@functools.cache
def _sitk_dtypes() -> dict[int, np.dtype]:
    """SimpleITK pixel id -> numpy type (built on first use: importing this module does not import SimpleITK)."""
    import SimpleITK as sitk

    names = {"sitkUInt8": "u1", "sitkInt8": "i1", "sitkUInt16": "u2", "sitkInt16": "i2", "sitkUInt32": "u4", "sitkInt32": "i4",
             "sitkUInt64": "u8", "sitkInt64": "i8", "sitkFloat32": "f4", "sitkFloat64": "f8"}
    return {getattr(sitk, name): np.dtype(code) for name, code in names.items()}


def _read_voxels(path: Path, header: Header) -> np.ndarray:
    """The stored voxels as a flat, writeable array of ``header.dtype``, read completely and no further."""
    try:
        with open(header.data_file, "rb") as handle:
            if header.compression == "none":
                buffer = bytearray(header.nbytes)
                _read_raw(handle, header, buffer, path)
                return np.frombuffer(buffer, dtype=header.dtype)
            # A .nii.gz is one gzip stream: header, extensions, then the voxels; the others hold only voxels.
            skip = header.offset if header.format == "nifti1" else 0
            if header.format != "nifti1":
                handle.seek(header.offset)
            buffer = bytearray(skip + header.nbytes)
            gzip_format = header.compression == "gzip"
            if not _inflate_at_once(handle, buffer, gzip_format):
                _inflate(handle, buffer, 31 if gzip_format else 47, path)
    except zlib.error as exc:
        raise ImageError(f"{path}: corrupt compressed data ({_reason(exc)}); re-save the image") from exc
    except OSError as exc:
        raise ImageError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    return np.frombuffer(buffer, dtype=header.dtype, offset=skip)


def _read_raw(handle: BinaryIO, header: Header, buffer: bytearray, path: Path) -> None:
    size = os.fstat(handle.fileno()).st_size
    offset = size - header.nbytes if header.offset < 0 else header.offset
    available = size - offset
    if available < header.nbytes:
        raise ImageError(f"{header.data_file}: truncated: {max(available, 0):,} of the {header.nbytes:,} voxel bytes "
                         f"that {path.name} declares (the file is damaged or was cut short; copy it again)")
    if available > header.nbytes and header.data_file == path:
        raise ImageError(f"{path}: holds {available - header.nbytes:,} bytes more than its header declares (a damaged or hostile file; re-save it)")
    handle.seek(offset)
    if handle.readinto(buffer) != header.nbytes:
        raise ImageError(f"{path}: truncated while reading the voxels")


def _inflate_at_once(handle: BinaryIO, buffer: bytearray, gzip_format: bool) -> bool:
    """The fast path: decompress the rest of ``handle`` into ``buffer`` in one call to libdeflate.

    libdeflate (through ``imagecodecs``, which nnU-Net installs) inflates 10-20 times faster than
    CPython's zlib and verifies the gzip CRC-32 and the zlib Adler-32. It is used only when the outcome
    is unambiguous: the compressed data is no larger than ``buffer`` could ever need, the stream fills
    ``buffer`` exactly, and a gzip file ends with the trailer of that stream (its length field equals
    the buffer's size). Anything else (no imagecodecs, a truncated, corrupt, oversized or multi-member
    stream) returns ``False`` after rewinding, and :func:`_inflate` decides, with the exact reason.
    """
    try:
        import imagecodecs
    except ImportError:
        return False
    start = handle.tell()
    available = os.fstat(handle.fileno()).st_size - start
    if available > len(buffer) + len(buffer) // 1000 + (1 << 16):  # more than stored deflate blocks need
        return False
    data = handle.read()
    handle.seek(start)
    try:
        decoded = imagecodecs.gzip_decode(data, out=buffer) if gzip_format else imagecodecs.deflate_decode(data, out=buffer)
    except Exception:  # DeflateError, GzipError: truncated, corrupt or too long; _inflate says which
        return False
    if len(decoded) != len(buffer) or decoded is not buffer:
        return False
    return not gzip_format or data[-4:] == struct.pack("<I", len(buffer) & 0xFFFFFFFF)


def _inflate(handle: BinaryIO, buffer: bytearray, wbits: int, path: Path) -> None:
    """Decompress the stream in ``handle`` into ``buffer``, streaming, with the exact reason for any failure.

    The stream must end, with a valid checksum (gzip CRC-32 and length, zlib Adler-32), after exactly
    ``len(buffer)`` bytes. It is never asked for more than one byte beyond that, so a decompression
    bomb costs at most one chunk of input and no memory beyond ``buffer``.
    """
    expected = len(buffer)
    view = memoryview(buffer)
    inflater, produced, pending = zlib.decompressobj(wbits), 0, b""
    while True:
        if not pending:
            pending = handle.read(_CHUNK)
            if not pending:
                break
        block = inflater.decompress(pending, expected - produced + 1)
        pending = inflater.unconsumed_tail
        if produced + len(block) > expected:
            raise ImageError(f"{path}: decompresses to more than the {expected:,} bytes its header declares (a damaged or hostile file; re-save it)")
        view[produced : produced + len(block)] = block
        produced += len(block)
        if inflater.eof:
            pending = inflater.unused_data + pending
            if wbits == 31 and pending.startswith(b"\x1f\x8b") and produced < expected:
                inflater = zlib.decompressobj(wbits)  # a gzip file may hold several members
                continue
            if pending.strip(b"\x00") or handle.read(1).strip(b"\x00"):
                raise ImageError(f"{path}: has data after the end of its compressed stream (a damaged or hostile file; re-save it)")
            break
    if not inflater.eof or produced < expected:
        raise ImageError(f"{path}: truncated: the compressed data ends after {produced:,} of {expected:,} bytes "
                         "(the file is damaged or was cut short; copy or export it again)")


def _decode(flat: np.ndarray, header: Header, dtype: np.dtype) -> np.ndarray:
    """Stored values -> the pixel type SimpleITK would return (NIfTI scaling applied as ITK applies it)."""
    if header.scale is not None:
        slope, inter = header.scale
        return (flat.astype(np.float64) * slope + inter).astype(dtype)
    if flat.dtype == dtype:
        return flat
    return flat.astype(dtype)


# --------------------------------------------------------------------------------------------------
# SimpleITK conversion and writing


def geometry_of(image) -> Geometry:  # image: SimpleITK.Image
    """Geometry of a SimpleITK image, converted to array-axis order."""
    return Geometry(
        shape=tuple(int(s) for s in reversed(image.GetSize())),
        spacing=tuple(float(s) for s in reversed(image.GetSpacing())),
        origin=tuple(float(o) for o in reversed(image.GetOrigin())),
        direction=tuple(float(d) for d in image.GetDirection()),
    )
def to_sitk(array: np.ndarray, geometry: Geometry):
    """Wrap an array (array-axis order) and its geometry into a SimpleITK image."""
    import SimpleITK as sitk

    if tuple(array.shape) != tuple(geometry.shape):
        raise ImageError(f"array shape {array.shape} does not match geometry shape {geometry.shape}")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(tuple(float(s) for s in reversed(geometry.spacing)))
    image.SetOrigin(tuple(float(o) for o in reversed(geometry.origin)))
    image.SetDirection(tuple(float(d) for d in geometry.direction))
    return image


def _umask_mode() -> int:
    """File mode a plain ``open()`` would give (mkstemp makes files 0600, too strict for shared results)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_image(array: np.ndarray, geometry: Geometry, path: str | Path, *, compress: bool = True) -> Path:
    """Write ``array`` with ``geometry`` to ``path`` atomically (temp file in the same folder, then rename)."""
    import SimpleITK as sitk

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = next((s for s in IMAGE_SUFFIXES if path.name.lower().endswith(s)), None)
    if suffix is None:
        raise ImageError(f"{path}: unsupported image suffix (use one of {', '.join(IMAGE_SUFFIXES)})")
    with atomic_output(path) as tmp_name:
        sitk.WriteImage(to_sitk(array, geometry), str(tmp_name), compress)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a text file atomically (temp file in the same folder, then rename)."""
    with atomic_output(path) as tmp_name:
        tmp_name.write_text(text, encoding="utf-8")
    return Path(path)


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` when the block succeeds.

    Readers never see a half-written file: they see the old file or the complete new one. The temporary
    file keeps the suffix of ``path`` (writers such as SimpleITK and pandas choose the format by it) and
    gets the permissions a plain ``open()`` would give. On any error it is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = next((s for s in IMAGE_SUFFIXES if path.name.lower().endswith(s)), path.suffix)
    fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
