"""Codecs for the `regions` array: `none`, `zstd`, `jpeg` (DESIGN.md §5).

- `none`: one chunk holding the whole `(n, R, R, 3)` array, bytes codec only, so the
  chunk file is the raw C-order array and readers memory-map it.
- `zstd`: chunks `(1, R, R, 3)`, zstd-compressed, one shard per slide.
- `jpeg`: chunks `(1, R, R, 3)` through `Jpeg8Codec` (Zarr v3 array-to-bytes codec
  `pixel_mamba.jpeg8` over imagecodecs' jpeg8), one shard per slide.

Importing this module registers `pixel_mamba.jpeg8` in zarr's codec registry, so any
reader that imports `pipeline.schema` can open a `jpeg` store.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from zarr.abc.codec import ArrayBytesCodec
from zarr.codecs import BytesCodec, ZstdCodec
from zarr.core.common import parse_named_configuration
from zarr.registry import register_codec

from pipeline.schema.errors import MissingCodecError

if TYPE_CHECKING:
    from typing import Self

    from zarr.core.array_spec import ArraySpec
    from zarr.core.buffer import Buffer, NDBuffer

JPEG_CODEC_ID = "pixel_mamba.jpeg8"
DEFAULT_ZSTD_LEVEL = 3
DEFAULT_JPEG_QUALITY = 90


@dataclass(frozen=True, kw_only=True)
class CodecSpec:
    """One entry of the registry.

    name: store-level codec name; zarr_codec: the Zarr v3 codec id that encodes the
    region chunks (None for `none`); package/module: what must be importable to use it;
    defaults: settings recorded in the store attributes.
    """

    name: str
    zarr_codec: str | None
    package: str | None
    module: str | None
    defaults: dict[str, Any]


CODEC_SPECS: dict[str, CodecSpec] = {
    "none": CodecSpec(name="none", zarr_codec=None, package=None, module=None, defaults={}),
    "zstd": CodecSpec(
        name="zstd", zarr_codec="zstd", package="numcodecs", module="numcodecs.zstd",
        defaults={"level": DEFAULT_ZSTD_LEVEL},
    ),
    "jpeg": CodecSpec(
        name="jpeg", zarr_codec=JPEG_CODEC_ID, package="imagecodecs", module="imagecodecs",
        defaults={"quality": DEFAULT_JPEG_QUALITY},
    ),
}


def codec_spec(name: str) -> CodecSpec:
    """Registry entry for a codec name; ValueError naming the known ones otherwise."""
    try:
        return CODEC_SPECS[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; choose one of {', '.join(CODEC_SPECS)}") from None


def codec_available(name: str) -> bool:
    """True when the package the codec needs can be imported (and, for jpeg, has jpeg8)."""
    spec = codec_spec(name)
    if spec.module is None:
        return True
    try:
        module = importlib.import_module(spec.module)
    except ImportError:
        return False
    if name == "jpeg":
        return hasattr(module, "jpeg8_encode") and hasattr(module, "jpeg8_decode")
    return True


def require_codec(name: str) -> CodecSpec:
    """The codec's spec; MissingCodecError naming the package when it cannot be used here."""
    spec = codec_spec(name)
    if not codec_available(name):
        raise MissingCodecError(
            f"codec {name!r} needs the Python package {spec.package!r}, which is not installed "
            f"(or lacks what the codec uses); install it with `pip install {spec.package}`"
        )
    return spec


def codec_settings(name: str, **settings: Any) -> dict[str, Any]:
    """The store's `codec` attribute: `{"name", "zarr_codec", **settings}` with defaults filled in.

    zstd accepts `level` (1..22); jpeg accepts `quality` (1..100).
    """
    spec = codec_spec(name)
    unknown = set(settings) - set(spec.defaults)
    if unknown:
        raise ValueError(f"codec {name!r} takes no setting(s) {sorted(unknown)}; known: {sorted(spec.defaults)}")
    merged = {**spec.defaults, **settings}
    if name == "zstd" and not (1 <= int(merged["level"]) <= 22):
        raise ValueError(f"zstd level must be in 1..22, got {merged['level']!r}")
    if name == "jpeg" and not (1 <= int(merged["quality"]) <= 100):
        raise ValueError(f"jpeg quality must be in 1..100, got {merged['quality']!r}")
    return {"name": name, "zarr_codec": spec.zarr_codec, **merged}


def region_array_kwargs(codec: dict[str, Any], *, n_regions: int, region_size: int) -> dict[str, Any]:
    """`zarr.create_array` keyword arguments for a slide's `regions` array `(n, R, R, 3) uint8`.

    `none` gets one chunk spanning the array (at least one region long, since zarr chunks
    cannot be empty); `zstd`/`jpeg` get `(1, R, R, 3)` chunks in one shard per slide.
    """
    name = codec["name"]
    require_codec(name)
    shape = (n_regions, region_size, region_size, 3)
    whole = (max(n_regions, 1), region_size, region_size, 3)
    common: dict[str, Any] = {"shape": shape, "dtype": "uint8", "fill_value": 0, "filters": None}
    if name == "none":
        return {**common, "chunks": whole, "serializer": BytesCodec(endian=None), "compressors": None}
    one = (1, region_size, region_size, 3)
    if name == "zstd":
        return {
            **common, "chunks": one, "shards": whole, "serializer": BytesCodec(endian=None),
            "compressors": ZstdCodec(level=int(codec["level"]), checksum=False),
        }
    return {
        **common, "chunks": one, "shards": whole,
        "serializer": Jpeg8Codec(quality=int(codec["quality"])), "compressors": None,
    }


def region_chunk_encoder(codec: dict[str, Any]) -> Callable[[np.ndarray], bytes]:
    """Encoder of one inner chunk (one region `(R, R, 3) uint8`) exactly as the zarr array
    from `region_array_kwargs` stores it inside its shard (used to stream shards to disk).
    """
    name = codec["name"]
    require_codec(name)
    if name == "zstd":
        from numcodecs.zstd import Zstd

        compressor = Zstd(level=int(codec["level"]), checksum=False)
        return lambda region: bytes(compressor.encode(np.ascontiguousarray(region, np.uint8)))
    if name == "jpeg":
        quality = int(codec["quality"])
        return lambda region: encode_jpeg(region, quality=quality)
    raise ValueError(f"codec {name!r} has no inner chunks: it stores one raw chunk per slide")


def encode_jpeg(image: np.ndarray, *, quality: int) -> bytes:
    """JPEG bytes of `(..., H, W, 3) uint8`; leading axes are stacked vertically."""
    import imagecodecs

    if image.dtype != np.uint8 or image.ndim < 3 or image.shape[-1] != 3:
        raise ValueError(f"jpeg codec needs (..., H, W, 3) uint8, got {image.shape} {image.dtype}")
    picture = np.ascontiguousarray(image.reshape(-1, image.shape[-2], 3))
    return bytes(imagecodecs.jpeg8_encode(picture, level=quality))


def decode_jpeg(data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of `encode_jpeg`: a uint8 array of `shape`."""
    import imagecodecs

    return np.asarray(imagecodecs.jpeg8_decode(data), dtype=np.uint8).reshape(shape)


@dataclass(frozen=True)
class Jpeg8Codec(ArrayBytesCodec):
    """Zarr v3 array-to-bytes codec `pixel_mamba.jpeg8`: lossy JPEG for `(..., H, W, 3) uint8` chunks.

    quality: JPEG quality 1..100 (90: ~30 dB PSNR, 6–8× smaller on tissue, measured in bench/store_io.py).
    """

    is_fixed_size = False
    quality: int

    def __init__(self, *, quality: int = DEFAULT_JPEG_QUALITY) -> None:
        if not (1 <= int(quality) <= 100):
            raise ValueError(f"jpeg quality must be in 1..100, got {quality!r}")
        object.__setattr__(self, "quality", int(quality))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        _, configuration = parse_named_configuration(data, JPEG_CODEC_ID, require_configuration=False)
        return cls(**(configuration or {}))

    def to_dict(self) -> dict[str, Any]:
        return {"name": JPEG_CODEC_ID, "configuration": {"quality": self.quality}}

    def evolve_from_array_spec(self, array_spec: ArraySpec) -> Self:
        return replace(self)

    def validate(self, *, shape: tuple[int, ...], dtype: Any, chunk_grid: Any) -> None:
        if np.dtype(dtype.to_native_dtype()) != np.uint8 or len(shape) < 3 or shape[-1] != 3:
            raise ValueError(f"{JPEG_CODEC_ID} needs a (..., H, W, 3) uint8 array, got shape {shape} dtype {dtype}")

    def compute_encoded_size(self, input_byte_length: int, chunk_spec: ArraySpec) -> int:
        raise NotImplementedError  # variable-size output

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        array = decode_jpeg(chunk_bytes.to_bytes(), chunk_spec.shape)
        return chunk_spec.prototype.nd_buffer.from_ndarray_like(array)

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        data = encode_jpeg(chunk_array.as_numpy_array(), quality=self.quality)
        return chunk_spec.prototype.buffer.from_bytes(data)


register_codec(JPEG_CODEC_ID, Jpeg8Codec)
