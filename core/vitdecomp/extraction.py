"""Dataset extraction: decompose every image once and cache the contributions (METHOD.md §2, "train on cached
contributions").

For each image x the cache stores the component contributions c_i(x) ``[C, D]`` of the exact decomposition
Σ_i c_i(x) = z(x) (Balasubramanian et al., NeurIPS 2024, §3.1, RepDecompose), optionally the L2-normalised CLIP
image embedding t(x) computed with CLIP's own preprocessing of the raw image (the CompAlign target, §3.2), and the
image's label. CompAlign (:func:`vitdecomp.fit_aligner`), CompAttribute (:class:`vitdecomp.StreamingScores`) and
TextSpan then run on the cache without touching the model again.

Layout of ``out_dir``::

    .vitdecomp-cache             the claim: extract writes into a folder that is empty or holds this marker
    meta.json                    model name and full weight fingerprint, component names, decompose settings, dtype,
                                 CLIP model, dataset fingerprint, shard size, completion state
    shard-00000.safetensors      contributions [n, C, D] (the cache dtype), targets [n, d] (float32, optional);
    shard-00001.safetensors      header metadata: index range, labels, largest reconstruction error, the digest of
    ...                          the settings, one content digest per input image, skipped images, a checksum

Shards are written atomically, so an interrupted run leaves only complete shards; calling :func:`extract` again with
the same arguments continues where it stopped (``resume=True``). A cache made for another model, other weights,
other settings or other images (file content, a dataset's samples) raises :class:`MismatchError` naming the
differences instead of being reused; every shard is self-describing, so this holds with ``meta.json`` deleted too.
Every shard's checksum (SHA-256 over its tensors' bytes and its header) is verified on resume and the first time a
process reads the shard; a truncated, altered or misplaced shard raises :class:`CorruptCacheError` naming the file,
and rerunning :func:`extract` re-extracts it.
Reading is memory-mapped (safetensors ``safe_open``): :meth:`ExtractionCache.contributions` with indices reads only
the rows it needs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import attrs
import torch

from . import distributed as dist
from ._fingerprint import bytes_digest, item_digest, weights_fingerprint
from .errors import CorruptCacheError, EmptyDatasetError, InputError, MismatchError, OutputError
from .engine import to_host, synchronize

__all__ = ["extract", "ExtractionCache", "CacheBatch", "IMAGE_SUFFIXES"]

_FORMAT = "vitdecomp.extraction/2"
_OLD_FORMATS = ("vitdecomp.extraction/1",)
_MARKER = ".vitdecomp-cache"
_TMP_PREFIX = ".vitdecomp-"  # extract's own temporary files; it never touches other *.tmp files
_SETTINGS_KEYS = ("model", "model_fingerprint", "decompose", "dtype", "clip_model", "clip_fingerprint", "shard_size",
                  "num_images", "data_fingerprint", "autocast")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def _dtype_name(dtype) -> str:
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise InputError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)}")
        return dtype
    for k, v in _DTYPES.items():
        if v == dtype:
            return k
    raise InputError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)}")


def _shard_name(j: int) -> str:
    return f"shard-{j:05d}.safetensors"


# ---------------------------------------------------------------------------------------------------- inputs


def _list_folder(root: Path) -> Tuple[List[str], List[Optional[str]]]:
    files = sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    labels = [f.split("/", 1)[0] if "/" in f else None for f in files]
    return files, labels


class _Items(torch.utils.data.Dataset):
    """(model input, CLIP input or None, label, index, content digest) for every image of a folder or a dataset.

    An item that cannot be read or preprocessed raises :class:`InputError` naming its path (or index); with
    ``skip=True`` it becomes ``(None, reason, index)`` and the batch goes on without it."""

    def __init__(self, source, preprocess, clip_preprocess, root: Optional[Path] = None, files=None, labels=None,
                 skip: bool = False):
        self.source, self.preprocess, self.clip_preprocess = source, preprocess, clip_preprocess
        self.root, self.files, self.folder_labels, self.skip = root, files, labels, skip

    def __len__(self):
        return len(self.files) if self.files is not None else len(self.source)

    def name(self, i) -> str:
        return f"image {self.root / self.files[i]} (index {i})" if self.files is not None else f"dataset item {i}"

    def digest(self, i) -> str:
        """The content digest of item ``i`` without decoding or preprocessing it (file bytes, or the sample)."""
        if self.files is not None:
            return bytes_digest((self.root / self.files[i]).read_bytes())
        return item_digest(self.source[i])

    def _raw(self, i):
        if self.files is not None:
            import io

            from PIL import Image

            data = (self.root / self.files[i]).read_bytes()
            with Image.open(io.BytesIO(data)) as im:
                return im.convert("RGB"), self.folder_labels[i], bytes_digest(data)
        item = self.source[i]
        digest = item_digest(item)
        if isinstance(item, (tuple, list)):
            if len(item) != 2:
                raise InputError(f"dataset items must be an image or (image, label); item {i} has {len(item)} parts")
            return item[0], item[1], digest
        return item, None, digest

    def __getitem__(self, i):
        try:
            img, label, digest = self._raw(i)
            if self.preprocess is not None and not isinstance(img, torch.Tensor):
                x = self.preprocess(img)
            else:
                x = None
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - a corrupt file or a failing dataset: named, then raised or skipped
            reason = f"{type(exc).__name__}: {exc}"
            if self.skip:
                return None, reason, i
            raise InputError(f"{self.name(i)} cannot be read: {reason}. Fix or remove it, or extract with "
                             "on_error='skip' (--skip-bad-images) to skip and record it") from exc
        if hasattr(label, "tolist") and not isinstance(label, (str, int, float, bool)):
            # tensors, numpy scalars and arrays: one value becomes a number, a label vector a list
            size = label.numel() if hasattr(label, "numel") else getattr(label, "size", None)
            label = label.item() if size == 1 and hasattr(label, "item") else label.tolist()
        if label is not None and not _json_label(label):
            label = str(label)
        is_tensor = isinstance(img, torch.Tensor)
        if self.clip_preprocess is not None and is_tensor:
            raise InputError(
                "CLIP targets are computed with CLIP's own preprocessing of the raw image, but the dataset returns "
                f"tensors (item {i}: {tuple(img.shape)}). Return PIL images and pass preprocess=..., or extract "
                "without clip=."
            )
        if is_tensor:  # documented: tensors are already preprocessed; never transform them a second time
            x = img
        elif self.preprocess is None:
            raise InputError(
                f"item {i} is a {type(img).__name__}, not a tensor; pass preprocess=... (the model's transform) or "
                "a LoadedModel, which carries its preprocessing"
            )
        if not isinstance(x, torch.Tensor) or x.ndim != 3:
            raise InputError(f"item {i}: the model input must be a [3, H, W] tensor, got {getattr(x, 'shape', type(x))}")
        if not x.is_floating_point():
            raise InputError(f"{self.name(i)}: images must be a floating-point tensor (float32 or float64, "
                             f"preprocessed and normalised); got {x.dtype}")
        xc = self.clip_preprocess(img) if self.clip_preprocess is not None else None
        return x, xc, label, i, digest


def _json_label(label) -> bool:
    if isinstance(label, (str, int, float, bool)):
        return True
    return isinstance(label, list) and all(_json_label(v) for v in label)


def _collate(batch):
    good = [b for b in batch if len(b) == 5]
    skipped = [(b[2], b[1]) for b in batch if len(b) == 3]
    if not good:
        return None, None, [], [], [], skipped
    xs, xcs, labels, idx, digests = zip(*good)
    return (torch.stack(xs), None if xcs[0] is None else torch.stack(xcs), list(labels), list(idx), list(digests),
            skipped)


def _resolve_model(model, preprocess, model_name):
    if isinstance(model, str):
        from .api import load_model

        model = load_model(model)
    if not isinstance(model, torch.nn.Module) and hasattr(model, "model"):  # LoadedModel
        preprocess = preprocess if preprocess is not None else getattr(model, "preprocess", None)
        model_name = model_name or getattr(model, "name", None)
        model = model.model
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"model must be a torch module, a LoadedModel or a model string, got {type(model).__name__}")
    if preprocess is None and hasattr(model, "pretrained_cfg") and "timm" in sys.modules:
        import timm.data

        cfg = timm.data.resolve_data_config({}, model=model)
        size = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if size is not None and tuple(cfg["input_size"][1:]) != tuple(size):  # built with img_size=...
            cfg["input_size"] = (3, *size)
        preprocess = timm.data.create_transform(**cfg)
    if model_name is None:
        # the architecture only: timm's pretrained tag is set even for random weights; the weight fingerprint in
        # the metadata tells weights apart
        arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
        model_name = f"timm:{arch}" if arch else type(model).__name__
    return model, preprocess, model_name


def _resolve_clip(clip, clip_name):
    if clip is None:
        return None, None, None
    if isinstance(clip, (tuple, list)) and len(clip) == 2:
        cm, cp = clip
        name = clip_name
    elif hasattr(clip, "model") and hasattr(clip, "preprocess"):  # LoadedModel
        cm, cp, name = clip.model, clip.preprocess, clip_name or getattr(clip, "name", None)
    else:
        raise InputError("clip must be an (open_clip model, preprocess) pair or a LoadedModel of an open_clip model")
    if not hasattr(cm, "encode_image"):
        raise InputError(f"the CLIP model must have encode_image (an open_clip model); got {type(cm).__name__}")
    if cp is None:
        raise InputError("the CLIP model needs its preprocessing transform (PIL image → tensor)")
    return cm, cp, name or type(cm).__name__


# ---------------------------------------------------------------------------------------------------- cache


@attrs.frozen
class CacheBatch:
    """One batch read from a cache: global ``indices`` [B], ``contributions`` [B, C, D], ``targets`` [B, d] or None,
    ``labels`` (list), ``representation`` [B, D] (the model's own z, float32) or None for caches written before
    it was stored."""

    indices: torch.Tensor = attrs.field(eq=False)
    contributions: torch.Tensor = attrs.field(eq=False)
    targets: Optional[torch.Tensor] = attrs.field(eq=False)
    labels: list = attrs.field(eq=False)
    representation: Optional[torch.Tensor] = attrs.field(eq=False, default=None)


@attrs.define(eq=False)
class ExtractionCache:
    """Cached per-image contributions, CLIP targets and labels written by :func:`extract`.

    Open one with :meth:`open`. ``len(cache)`` images, ``cache.names`` the C component names,
    ``cache.contributions(indices)`` ``[n, C, D]``, ``cache.targets()`` ``[N, d]``, ``cache.labels()``;
    iterating yields :class:`CacheBatch` es.
    """

    path: Path
    meta: Dict[str, Any]
    _shards: List[dict] = attrs.field(factory=list)  # per shard: file, start/stop (cache rows), src_start/src_stop
    _verified: set = attrs.field(factory=set, init=False)  # shard files whose checksum this object has verified

    @classmethod
    def open(cls, path, *, allow_partial: bool = False, verify: bool = False) -> "ExtractionCache":
        """Open the cache in ``path``. An unfinished extraction raises :class:`InputError` unless
        ``allow_partial`` (then only the completed shards are visible).

        Every shard's header is checked here (readable, not truncated, in its place, made with the cache's
        settings); its checksum is verified the first time this object reads it, or here for all shards with
        ``verify=True`` (:meth:`verify`; reads the whole cache once).
        A broken shard raises :class:`CorruptCacheError` naming the file; rerunning :func:`extract` repairs it."""
        path = Path(path)
        meta = _read_meta(path)
        digest = _settings_digest(meta)
        shards = []
        for j in range(meta["num_shards"]):
            f = path / _shard_name(j)
            if not f.exists():
                continue
            header = _read_header(f)
            _check_header(f, header, j, meta, digest)
            shards.append({"file": f, "src_start": header["start"], "src_stop": header["stop"],
                           "labels": header["labels"], "skipped": header.get("skipped", []),
                           "max_error": header.get("max_error"), "error_vs_float32": header.get("error_vs_float32"),
                           "header": header})
        complete = meta.get("complete", False) and len(shards) == meta["num_shards"]
        if not complete and not allow_partial:
            raise InputError(
                f"extraction cache {path} is incomplete ({len(shards)} of {meta['num_shards']} shards); run "
                "vitdecomp.extract with the same arguments to finish it, or open(..., allow_partial=True)"
            )
        if allow_partial:  # expose a contiguous prefix of shards so that indices stay meaningful
            prefix = []
            for s in shards:
                if s["src_start"] != (prefix[-1]["src_stop"] if prefix else 0):
                    break
                prefix.append(s)
            shards = prefix
        row = 0  # cache rows: the images that were not skipped, in order
        for s in shards:
            n = s["src_stop"] - s["src_start"] - len(s["skipped"])
            s["start"], s["stop"] = row, row + n
            row += n
        if not shards or row == 0:
            raise EmptyDatasetError(f"extraction cache {path} holds no images yet")
        cache = cls(path, meta, shards)
        if verify:
            cache.verify()
        return cache

    def verify(self) -> None:
        """Verify every shard's checksum now (reads every byte of the cache once); raises
        :class:`CorruptCacheError` naming the first broken shard."""
        for s in self._shards:
            self._ensure(s)

    def _ensure(self, shard: dict) -> None:
        if shard["file"] not in self._verified:
            _verify_file(shard["file"], shard["header"])
            self._verified.add(shard["file"])

    @property
    def skipped(self) -> Dict[int, str]:
        """Images that could not be read and were skipped (``on_error="skip"``): dataset index → reason."""
        return {int(i): r for s in self._shards for i, r in s["skipped"]}

    def source_indices(self) -> List[int]:
        """For every cache row, the index of its image in the dataset (differs from the row after a skip)."""
        out = []
        for s in self._shards:
            skip = {int(i) for i, _ in s["skipped"]}
            out += [i for i in range(s["src_start"], s["src_stop"]) if i not in skip]
        return out

    # ------------------------------------------------------------------ description
    def __len__(self) -> int:
        return self._shards[-1]["stop"] if self._shards else 0

    def __repr__(self) -> str:
        return (f"ExtractionCache({str(self.path)!r}, {len(self)} images, {len(self.names)} components, "
                f"D={self.dim}, model={self.model_name!r}, clip={self.clip_model!r})")

    @property
    def names(self) -> tuple:
        """Component names in forward order."""
        return tuple(self.meta["names"])

    @property
    def model_name(self) -> str:
        return self.meta["model"]

    @property
    def clip_model(self) -> Optional[str]:
        return self.meta.get("clip_model")

    @property
    def dim(self) -> int:
        """D, the analysed model's representation size."""
        return self.meta["dim"]

    @property
    def target_dim(self) -> Optional[int]:
        """d, the CLIP embedding size (None without CLIP targets)."""
        return self.meta.get("target_dim")

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.meta["dtype"]]

    @property
    def has_targets(self) -> bool:
        return self.meta.get("clip_model") is not None

    @property
    def shard_ranges(self) -> List[Tuple[int, int]]:
        """``[(start, stop), ...]``: the image indices each shard holds."""
        return [(s["start"], s["stop"]) for s in self._shards]

    @property
    def shard_errors_vs_float32(self) -> List[Optional[float]]:
        """Per shard, the measured relative error of a reduced-precision (autocast) extraction against a float32
        forward (None for float32 extractions)."""
        return [s.get("error_vs_float32") for s in self._shards]

    @property
    def max_error(self) -> float:
        """The largest relative reconstruction error ‖Σ_i c_i − z‖/‖z‖ seen during extraction (before casting)."""
        errs = [s["max_error"] for s in self._shards if s.get("max_error") is not None]
        return max(errs) if errs else float("nan")

    # ------------------------------------------------------------------ reading
    def _read(self, shard: dict, key: str, lo: int, hi: int) -> torch.Tensor:
        from safetensors import safe_open

        self._ensure(shard)
        with safe_open(str(shard["file"]), framework="pt") as f:
            return f.get_slice(key)[lo:hi]

    def load_shard(self, j: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(contributions [n, C, D], targets [n, d] or None) of shard ``j``."""
        from safetensors import safe_open

        self._ensure(self._shards[j])
        with safe_open(str(self._shards[j]["file"]), framework="pt") as f:
            keys = set(f.keys())
            return f.get_tensor("contributions"), (f.get_tensor("targets") if "targets" in keys else None)

    def _gather(self, key: str, indices) -> torch.Tensor:
        if indices is None:
            parts = [self._read(s, key, 0, s["stop"] - s["start"]) for s in self._shards]
            return torch.cat(parts)
        idx = torch.as_tensor(indices, dtype=torch.long).flatten()
        n = len(self)
        if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
            raise InputError(f"indices out of range for a cache of {n} images")
        idx = torch.where(idx < 0, idx + n, idx)
        out = None
        starts = torch.tensor([s["start"] for s in self._shards])
        which = torch.searchsorted(starts, idx, right=True) - 1
        for j in torch.unique(which).tolist():
            s = self._shards[j]
            sel = torch.nonzero(which == j).flatten()
            local = idx[sel] - s["start"]
            lo, hi = int(local.min()), int(local.max()) + 1
            block = self._read(s, key, lo, hi)  # memory-mapped: only rows lo..hi are read
            vals = block[local - lo]
            if out is None:
                out = vals.new_empty((idx.numel(),) + tuple(vals.shape[1:]))
            out[sel] = vals
        if out is None:
            return torch.empty(0)
        return out

    def contributions(self, indices=None) -> torch.Tensor:
        """Contributions ``[n, C, D]`` (the cache dtype) of the images ``indices`` (default: all)."""
        return self._gather("contributions", indices)

    @property
    def has_representation(self) -> bool:
        """True when the shards store the model's own representation z (float32) next to the contributions."""
        from safetensors import safe_open

        if not self._shards:
            return False
        with safe_open(str(self._shards[0]["file"]), framework="pt") as f:
            return "representation" in set(f.keys())

    def representation(self, indices=None) -> torch.Tensor:
        """The model's own representation z ``[n, D]`` (float32, computed in the same pass as the contributions) of
        the images ``indices``: with nothing ablated, mean ablation re-reads the head on exactly this."""
        if not self.has_representation:
            raise InputError(f"extraction cache {self.path} stores no representation (made by an older version)")
        return self._gather("representation", indices)

    def targets(self, indices=None) -> torch.Tensor:
        """CLIP image embeddings ``[n, d]`` (float32, unit norm) of the images ``indices`` (default: all)."""
        if not self.has_targets:
            raise InputError(f"extraction cache {self.path} has no CLIP targets; extract with clip=...")
        return self._gather("targets", indices)

    def labels(self) -> list:
        """The label of every image (class-folder name, the dataset's label, or None)."""
        return [lab for s in self._shards for lab in s["labels"]]

    def paths(self) -> Optional[List[str]]:
        """Image paths relative to the folder (None when extracted from a dataset object)."""
        items = self.meta.get("data", {}).get("files")
        return None if items is None else [items[i] for i in self.source_indices()]

    def local_shards(self) -> List[int]:
        """Shard numbers this process reads when work is split across a torch.distributed group (shard j goes to
        rank j mod world size, as in :func:`extract`); all shards without a group."""
        di = dist.info()
        return [j for j in range(len(self._shards)) if j % di.world_size == di.rank]

    def batches(self, batch_size: int = 256, *, targets: bool = True, local: bool = False) -> Iterator[CacheBatch]:
        """Iterate over the cache in order, ``batch_size`` images at a time (batches do not cross shards).
        ``local=True``: only this rank's shards (:meth:`local_shards`) under torch.distributed."""
        shards = [self._shards[j] for j in self.local_shards()] if local else self._shards
        for s in shards:
            from safetensors import safe_open

            n = s["stop"] - s["start"]
            self._ensure(s)
            with safe_open(str(s["file"]), framework="pt") as f:
                keys = set(f.keys())
                has_t = targets and "targets" in keys
                cs, ts = f.get_slice("contributions"), (f.get_slice("targets") if has_t else None)
                zs = f.get_slice("representation") if "representation" in keys else None
                for i in range(0, n, batch_size):
                    j = min(i + batch_size, n)
                    yield CacheBatch(torch.arange(s["start"] + i, s["start"] + j), cs[i:j],
                                     ts[i:j] if ts is not None else None, s["labels"][i:j],
                                     zs[i:j] if zs is not None else None)

    def __iter__(self) -> Iterator[CacheBatch]:
        return self.batches()


# ---------------------------------------------------------------------------------------------------- extraction


def _atomic_write_json(path: Path, obj) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_TMP_PREFIX, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _settings_digest(meta: dict) -> str:
    """The digest of what a cache was made from (model and weights, CLIP, options, dataset): every shard carries it,
    so a shard is recognised as another cache's even without meta.json."""
    blob = json.dumps({k: meta.get(k) for k in _SETTINGS_KEYS}, sort_keys=True, default=str)
    return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()


def _checksum(tensors: Dict[str, torch.Tensor], header: dict) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in header.items() if k != "checksum"}, sort_keys=True).encode())
    for k in sorted(tensors):
        t = tensors[k]
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype}\n".encode())
        flat = t.contiguous().reshape(-1)
        if flat.numel():
            h.update(memoryview(flat.view(torch.uint8).numpy()))
    return h.hexdigest()[:32]


_REBUILD = "rerun vitdecomp extract with the same arguments to re-extract it"


def _read_header(f: Path) -> dict:
    """A shard's vitdecomp header, after checking that the file is as long as its safetensors header says."""
    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if size < 8 + n:
                raise ValueError(f"file of {size} bytes, but its header alone declares {8 + n}")
            st = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in st.items() if k != "__metadata__"), default=0)
        if size != 8 + n + end:
            raise ValueError(f"file of {size} bytes, its header declares {8 + n + end} (truncated or extended)")
        header = json.loads((st.get("__metadata__") or {})["vitdecomp"])
        for k in ("start", "stop", "labels", "settings", "checksum"):
            header[k]  # noqa: B018 - presence check
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorruptCacheError(f"shard {f} is truncated or unreadable ({type(exc).__name__}: {exc}); {_REBUILD}") \
            from exc
    return header


def _check_header(f: Path, header: dict, j: int, meta: dict, digest: str) -> None:
    lo, hi = j * meta["shard_size"], min(meta["num_images"], (j + 1) * meta["shard_size"])
    if (header["start"], header["stop"]) != (lo, hi):
        raise CorruptCacheError(
            f"shard {f} holds images {header['start']}..{header['stop']}, but shard {j} of this cache covers "
            f"{lo}..{hi} (a copied, renamed or misplaced shard); remove it and {_REBUILD}"
        )
    if header["settings"] != digest:
        raise MismatchError(
            f"shard {f} was made with other settings than {f.parent / 'meta.json'} describes (another model, other "
            "weights, options or dataset); it does not belong to this cache. Extract into another folder, or "
            "rerun with resume=False (--no-resume) to rebuild this one"
        )


def _verify_file(f: Path, header: dict) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(f), framework="pt") as sf:
            tensors = {k: sf.get_tensor(k) for k in sf.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise CorruptCacheError(f"shard {f} cannot be read ({type(exc).__name__}: {exc}); {_REBUILD}") from exc
    if _checksum(tensors, header) != header["checksum"]:
        raise CorruptCacheError(f"shard {f} fails its checksum (its bytes changed after it was written); {_REBUILD}")


def _read_meta(path: Path) -> dict:
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise InputError(f"{path} is not an extraction cache (no meta.json); create one with vitdecomp.extract")
    try:
        meta = json.loads(meta_file.read_text())
        if not isinstance(meta, dict):
            raise ValueError(f"a JSON {type(meta).__name__}, not an object")
    except (OSError, ValueError) as exc:
        raise CorruptCacheError(f"{meta_file} is broken ({type(exc).__name__}: {exc}); rerun vitdecomp extract with "
                                "the same arguments to rebuild it (its shards are verified and kept)") from exc
    fmt = meta.get("format")
    if fmt in _OLD_FORMATS:
        raise MismatchError(
            f"{path} was written by an older vitdecomp ({fmt}) without shard checksums and content digests; "
            f"rebuild it: run vitdecomp extract into a new folder (or delete {path} yourself and rerun)"
        )
    if fmt != _FORMAT:
        raise MismatchError(f"{meta_file} has format {fmt!r}; expected {_FORMAT!r}")
    missing = [k for k in ("num_shards", "shard_size", "num_images", "names", "dim", "dtype") if k not in meta]
    if missing:
        raise CorruptCacheError(f"{meta_file} lacks {missing}; rerun vitdecomp extract with the same arguments to "
                                "rebuild it")
    return meta


def _compare(old: dict, new: dict, path: Path) -> None:
    diffs = [f"{k}: cache has {old.get(k)!r}, now {new.get(k)!r}" for k in _SETTINGS_KEYS if old.get(k) != new.get(k)]
    if diffs:
        raise MismatchError(
            f"The extraction cache in {path} was made with other settings; " + "; ".join(diffs)
            + ". Use another out_dir, or resume=False to overwrite it."
        )


def _is_ours(p: Path) -> bool:
    return p.name.startswith(_TMP_PREFIX) and p.name.endswith(".tmp")


def check_out(out: Path) -> None:
    """Raise :class:`OutputError` (or :class:`MismatchError` for an old cache) when :func:`extract` would refuse
    ``out``; writes nothing. The command line calls it before loading any model."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"the output path {out} exists and is not a folder")
    if out.is_dir():
        _refuse_foreign(out)
    from ._cli_checks import check_out_dir

    check_out_dir(out)


def _refuse_foreign(out: Path) -> None:
    marker = out / _MARKER
    if not marker.is_file():
        # the marker itself may appear between the two looks: another process (a rank of the same torchrun launch,
        # on another node) claiming the same folder at the same moment; that folder is still ours
        others = sorted(p.name for p in out.iterdir() if not _is_ours(p) and p.name != _MARKER)
        if others:
            old = out / "meta.json"
            if old.is_file() and '"vitdecomp.extraction/1"' in old.read_text(errors="replace"):
                raise MismatchError(
                    f"{out} holds a cache written by an older vitdecomp (vitdecomp.extraction/1, without shard "
                    f"checksums); extract into a new folder, or delete {out} yourself and rerun"
                )
            raise OutputError(
                f"the output folder {out} is not empty ({', '.join(others[:5])}{', ...' if len(others) > 5 else ''}) "
                "and is not a vitdecomp extraction cache; extract never writes into, deletes or reuses files it did "
                "not write. Choose a new or empty folder"
            )


def _claim(out: Path) -> None:
    """Make sure ``out`` is writable and is (or becomes) this library's cache folder, before any expensive work:
    an empty or new folder is claimed with the marker file; a folder holding other files is refused."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"the output path {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output folder {out}: {exc.strerror or exc}") from exc
    _refuse_foreign(out)
    marker = out / _MARKER
    try:
        _atomic_write_json(marker, {"format": _FORMAT, "written_by": "vitdecomp.extract"})
    except OSError as exc:
        raise OutputError(f"the output folder {out} is not writable: {exc.strerror or exc}") from exc


def _extract_batch(model, x, xc, clip_model, *, device, model_dtype, ac, measure32: bool, store_dtype, registry,
                   dk, fingerprint=False, input_stats=False) -> dict:
    """The device part of extraction for one batch, free of host synchronisation: decompose, cast, queue the
    copies to the host. Returns names, host tensors ``contributions``/``representation`` (``targets``), and the
    device-side scalars ``error`` (max reconstruction error) and ``finite``. With ``ac`` and ``measure32`` the
    reduced-precision error against float32 is measured (one synchronisation, once per shard). ``input_stats``:
    the model's normalisation (:func:`vitdecomp._input_range.input_stats`) to check the batch's value range against
    on the host, before it is copied to the device (``False``: not checked); ``fingerprint``: the model's weight
    fingerprint, computed once per extraction, recorded by decompose."""
    from ._input_range import check_image_range
    from .api import decompose

    if input_stats is not False:
        check_image_range(x, input_stats)  # the same error decompose gives, on the host: no device synchronisation
    x = x.to(device, model_dtype, non_blocking=True)
    out = {}
    dec = decompose(model, x, check=False, registry=registry, autocast=ac, compare_float32=measure32,
                    fingerprint=fingerprint, check_input=False, **dk)
    if ac is not None and measure32:
        out["error_vs_float32"] = dec.meta["error_vs_float32"]
    out["names"] = list(dec.names)
    out["error"] = dec.error_tensor().max().to(torch.float64)
    c_dev = dec.contributions.detach().to(store_dtype)
    out["finite"] = torch.isfinite(c_dev).all()
    out["contributions"] = to_host(c_dev)
    out["representation"] = to_host(dec.representation.detach().to(torch.float32))
    if clip_model is not None:
        with torch.no_grad():
            t = clip_model.encode_image(xc.to(device, next(clip_model.parameters()).dtype, non_blocking=True))
        out["targets"] = to_host(torch.nn.functional.normalize(t.float(), dim=-1))
    return out


def extract(model, data, out_dir, *, preprocess=None, clip=None, clip_name: Optional[str] = None,
            batch_size: int = 32, dtype=torch.float16, device="cpu", decompose_kwargs: Optional[dict] = None,
            shard_size: int = 1024, progress: bool = True, resume: bool = True, num_workers: int = 0,
            model_name: Optional[str] = None, registry=None, autocast=None,
            on_error: str = "raise", check_input: bool = True) -> ExtractionCache:
    """Decompose every image of ``data`` and cache the contributions in ``out_dir``.

    :param model: a supported model (``torch.nn.Module``), a :class:`vitdecomp.LoadedModel` (brings its
        preprocessing and name) or a model string for :func:`vitdecomp.load_model`.
    :param data: an image folder (searched recursively for .jpg/.jpeg/.png; the first-level subfolder is the
        label) or a torch ``Dataset`` returning images or ``(image, label)`` pairs, the images as PIL images or
        as preprocessed ``[3, H, W]`` tensors (tensors cannot have CLIP targets).
    :param preprocess: the model's transform PIL → tensor (default: the LoadedModel's, or timm's data config).
    :param clip: an ``(open_clip model, preprocess)`` pair or a LoadedModel of one: also store the normalised
        CLIP image embedding of every image (the CompAlign target). ``clip_name`` names it in the metadata.
    :param dtype: storage dtype of the contributions (decomposition runs in float32; a value that overflows
        float16 raises :class:`InputError`).
    :param decompose_kwargs: ``heads``, ``start``, ``bias`` for :func:`vitdecomp.decompose`.
    :param shard_size: images per shard file (the unit of resumption).
    :param out_dir: a new or empty folder, or one that holds a cache written by :func:`extract` (its marker file
        ``.vitdecomp-cache``); any other non-empty folder is refused with :class:`OutputError` before work starts.
    :param resume: continue an interrupted extraction in ``out_dir``; ``False`` deletes its shards first (only the
        files extract wrote there). On resume every finished shard is verified (checksum, settings, and the content
        digest of each of its images); a corrupt shard is re-extracted, a shard of other settings or other images
        raises :class:`MismatchError`.
    :param on_error: ``"raise"`` (default): an image that cannot be read or preprocessed raises
        :class:`InputError` naming its path and index; ``"skip"``: it is left out of the cache and recorded
        (:attr:`ExtractionCache.skipped`), and finished shards stay valid.
    :param check_input: refuse batches of 0–255 pixel values or unnormalised [0, 1] images (for a model whose
        preprocessing normalises), with the error :func:`vitdecomp.decompose` gives, naming the image; the accepted
        range comes from ``preprocess`` or the model's own config (:mod:`vitdecomp._input_range`). ``False``
        accepts any finite values.
    :param device: ``"cpu"``, ``"cuda"`` (under torchrun: ``cuda:LOCAL_RANK``) or a device. On CUDA, loading uses
        pinned memory, finished contributions are copied to the host asynchronously, and the host synchronises
        once per shard.
    :param autocast: ``"bf16"``/``"fp16"``: run the model under autocast; the error against a float32 forward is
        measured on the first batch of every shard and stored (``ExtractionCache.shard_errors_vs_float32``).

    Under torch.distributed (e.g. ``torchrun --nproc_per_node N``) every rank extracts a disjoint set of shards
    (shard j goes to rank j mod N), rank 0 writes the metadata and the merged index, an interrupted run resumes
    per rank, and the cache is identical to a single-process one.
    :returns: the :class:`ExtractionCache`.
    """
    from tqdm.auto import tqdm

    dtype_name = _dtype_name(dtype)
    store_dtype = _DTYPES[dtype_name]
    for what, v in (("batch_size", batch_size), ("shard_size", shard_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InputError(f"{what} must be an integer ≥ 1, got {v!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise InputError(f"num_workers must be an integer ≥ 0, got {num_workers!r}")
    if on_error not in ("raise", "skip"):
        raise InputError(f"on_error={on_error!r}: use 'raise' (stop at an unreadable image) or 'skip' (skip and "
                         "record it)")
    dk = {"heads": True, "start": None, "bias": "explicit", **(decompose_kwargs or {})}
    unknown = set(dk) - {"heads", "start", "bias", "adapter"}
    if unknown:
        raise InputError(f"decompose_kwargs {sorted(unknown)} are not supported for extraction; use heads, start, bias "
                         "(token-level detail is not cached)")
    if isinstance(dk.get("start"), tuple):
        dk["start"] = list(dk["start"])
    out = Path(out_dir)
    _claim(out)  # before loading anything: a wrong --out fails now, not after the work
    from ._input_range import input_stats

    # the accepted range as decompose defines it: the caller's (or the LoadedModel's) preprocess, else the model's
    # own config (not the transform built from it below, which says the same under another name)
    own_pre = preprocess if preprocess is not None else (None if isinstance(model, (str, torch.nn.Module))
                                                         else getattr(model, "preprocess", None))
    was_string = isinstance(model, str)
    model, preprocess, model_name = _resolve_model(model, preprocess, model_name)
    if was_string:  # the LoadedModel load_model made, with its preprocessing
        own_pre = preprocess
    stats = input_stats(model, own_pre) if check_input else False
    clip_model, clip_pre, clip_name = _resolve_clip(clip, clip_name)
    from .api import _autocast_dtype, _check_eval

    ac = _autocast_dtype(autocast)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and dist.info().active:
        device = torch.device("cuda", dist.info().local_rank)
    model = model.to(device).eval()
    _check_eval(model)
    if clip_model is not None:
        clip_model = clip_model.to(device).eval()

    skip = on_error == "skip"
    if isinstance(data, (str, os.PathLike)):
        root = Path(data)
        if not root.is_dir():
            raise InputError(f"data {root} is not a directory (pass an image folder or a torch Dataset)")
        files, labels = _list_folder(root)
        if not files:
            raise EmptyDatasetError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {root}")
        items = _Items(None, preprocess, clip_pre, root=root, files=files, labels=labels, skip=skip)
        data_meta = {"kind": "folder", "root": str(root.resolve()), "files": files}
        data_fp = hashlib.sha256("\n".join(files).encode()).hexdigest()[:16]
    elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        if len(data) == 0:
            raise EmptyDatasetError(f"the dataset {type(data).__name__} is empty")
        items = _Items(data, preprocess, clip_pre, skip=skip)
        data_meta = {"kind": "dataset", "class": f"{type(data).__module__}.{type(data).__qualname__}"}
        data_fp = f"dataset:{len(data)}"  # its identity is its samples: one content digest per item in the shards
    else:
        raise InputError(f"data must be an image folder or a torch Dataset, got {type(data).__name__}")

    N = len(items)
    num_shards = math.ceil(N / shard_size)
    settings = {
        "format": _FORMAT, "model": model_name, "model_fingerprint": weights_fingerprint(model),
        "decompose": {k: v for k, v in dk.items() if k != "adapter"}, "dtype": dtype_name,
        "clip_model": clip_name,
        "clip_fingerprint": weights_fingerprint(clip_model) if clip_model is not None else None,
        "shard_size": shard_size, "num_images": N, "num_shards": num_shards, "data_fingerprint": data_fp,
        "autocast": None if ac is None else str(ac).replace("torch.", ""),
        "data": data_meta,
    }
    settings = json.loads(json.dumps(settings))  # as it reads back from meta.json (tuples → lists)
    digest = _settings_digest(settings)
    meta_file = out / "meta.json"
    if dist.info().active:  # every rank must decompose the same model with the same weights
        fps = dist.all_gather_objects((settings["model_fingerprint"], settings["clip_fingerprint"], N))
        if any(f != fps[0] for f in fps):
            raise MismatchError(f"ranks hold different models, weights or datasets (fingerprints per rank: {fps}); "
                                "load the same checkpoint on every rank (seed random initialisations)")
    # Under torch.distributed (torchrun) rank 0 owns meta.json; every rank writes only its own shards.
    di = dist.info()
    state = None
    if di.rank == 0:
        try:
            state = {"meta": _prepare_cache(out, meta_file, settings, resume)}
        except Exception as exc:  # noqa: BLE001 - forwarded to the other ranks, re-raised everywhere
            state = {"error": exc}
    state = dist.broadcast_object(state)
    if "error" in state:
        raise state["error"]
    meta = state["meta"]

    mine = [j for j in range(num_shards) if j % di.world_size == di.rank]  # disjoint shards per rank
    done = [j for j in mine if _resumable(out / _shard_name(j), j, settings, digest, items)]
    todo = [j for j in mine if j not in set(done)]
    size_of = lambda j: min(N, (j + 1) * shard_size) - j * shard_size  # noqa: E731
    desc = "extracting" if not di.active else f"extracting (rank {di.rank}/{di.world_size})"
    bar = tqdm(total=sum(size_of(j) for j in mine), initial=sum(size_of(j) for j in done), desc=desc, unit="img",
               disable=not progress or di.rank != 0)
    model_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    on_cuda = device.type == "cuda"
    try:
        for j in todo:
            start, stop = j * shard_size, min(N, (j + 1) * shard_size)
            loader = torch.utils.data.DataLoader(
                torch.utils.data.Subset(items, range(start, stop)), batch_size=batch_size, shuffle=False,
                num_workers=num_workers, collate_fn=_collate, pin_memory=on_cuda,
            )
            contribs, targets, labels, reps, rows = [], [], [], [], []
            inputs: List[Optional[str]] = [None] * (stop - start)
            skipped: List[list] = []
            # device-side running maxima: no host synchronisation until the shard is written
            err_t = torch.zeros((), device=device, dtype=torch.float64)
            finite_t = torch.ones((), device=device, dtype=torch.bool)
            err32 = []
            first = True
            for x, xc, lab, idx, digs, skips in loader:
                for i, reason in skips:
                    skipped.append([i, reason])
                    import warnings

                    warnings.warn(f"skipped {items.name(i)}: {reason}", stacklevel=2)
                if x is None:
                    bar.update(len(skips))
                    continue
                for i, d in zip(idx, digs):
                    inputs[i - start] = d
                try:
                    res = _extract_batch(model, x, xc, clip_model, device=device, model_dtype=model_dtype, ac=ac,
                                         measure32=first, store_dtype=store_dtype, registry=registry, dk=dk,
                                         fingerprint=settings["model_fingerprint"], input_stats=stats)
                except InputError as exc:
                    if getattr(exc, "index", None) is None:
                        raise
                    raise InputError(f"{items.name(idx[exc.index])} (batch {len(rows)} of its shard): {exc}") from exc
                if first and j == todo[0]:
                    _warn_if_disk_too_small(out, res, sum(size_of(k) for k in todo))
                first = False
                if meta["names"] is None:
                    meta.update(names=res["names"], dim=res["contributions"].shape[-1])
                elif res["names"] != meta["names"]:
                    from .compalign import _first_difference

                    raise MismatchError(
                        "the decomposition's components differ from the cache's "
                        f"({_first_difference(res['names'], meta['names'])})"
                    )
                err_t = torch.maximum(err_t, res["error"])
                finite_t &= res["finite"]
                if "error_vs_float32" in res:
                    err32.append(res["error_vs_float32"])
                contribs.append(res["contributions"])
                reps.append(res["representation"])
                rows.append(idx)
                if "targets" in res:
                    targets.append(res["targets"])
                labels.extend(lab)
                bar.update(len(idx) + len(skips))
            synchronize(device)
            if not bool(finite_t):
                _raise_nonfinite(contribs, reps, targets, rows, items, dtype_name)
            if not contribs:
                if meta["names"] is None:
                    raise InputError(f"every image of shard {j} (images {start}..{stop}) was skipped; nothing to "
                                     "learn the components from. See the warnings for the reasons")
                contribs = [torch.empty(0, len(meta["names"]), meta["dim"], dtype=store_dtype)]
                reps = [torch.empty(0, meta["dim"])]
                if clip_model is not None:
                    targets = [torch.empty(0, meta.get("target_dim") or 0)]
            max_err = float(err_t)
            tensors = {"contributions": torch.cat(contribs).contiguous(),
                       "representation": torch.cat(reps).contiguous()}
            if targets:
                tensors["targets"] = torch.cat(targets).contiguous()
                meta["target_dim"] = tensors["targets"].shape[1]
            shard_meta = {"start": start, "stop": stop, "labels": labels, "max_error": max_err,
                          "settings": digest, "inputs": inputs, "skipped": sorted(skipped)}
            if err32:
                shard_meta["error_vs_float32"] = max(err32)
            shard_meta["checksum"] = _checksum(tensors, shard_meta)
            _write_shard(out, j, tensors, shard_meta, len(done) + todo.index(j))
            if not di.active:
                _atomic_write_json(meta_file, meta)
    finally:
        bar.close()
    if di.active:
        # every rank may have learnt the component names; rank 0 merges them and writes the index
        found = dist.all_gather_objects({k: meta.get(k) for k in ("names", "dim", "target_dim")})
        for k in ("names", "dim", "target_dim"):
            values = [f[k] for f in found if f[k] is not None]
            if values and any(v != values[0] for v in values):
                raise MismatchError(f"ranks disagree on the cache's {k}: {values}")
            if values:
                meta[k] = values[0]
    if di.rank == 0:
        meta["complete"] = all((out / _shard_name(j)).exists() for j in range(num_shards))
        meta["index"] = [{"file": _shard_name(j), "start": j * shard_size, "stop": j * shard_size + size_of(j),
                          "rank": j % di.world_size} for j in range(num_shards)]
        meta["world_size"] = di.world_size
        _atomic_write_json(meta_file, meta)
    dist.barrier()
    return ExtractionCache.open(out)


def _warn_if_disk_too_small(out: Path, res: dict, images: int) -> None:
    """After the first batch the size of a row is known: warn early when the rest will not fit on the disk (the
    write itself then fails with :class:`OutputError`, keeping the finished shards)."""
    import shutil
    import warnings

    rows = res["contributions"].shape[0]
    per_image = sum(res[k].element_size() * res[k].numel() for k in ("contributions", "representation", "targets")
                    if k in res) / max(rows, 1)
    need, free = per_image * images, shutil.disk_usage(out).free
    if need > free:
        warnings.warn(f"the cache needs about {need / 2**30:.2f} GiB more but {out} has {free / 2**30:.2f} GiB free; "
                      "extraction will stop with an error when the disk is full (finished shards are kept)",
                      stacklevel=3)


def _write_shard(out: Path, j: int, tensors: dict, shard_meta: dict, kept: int) -> None:
    """Write shard ``j`` atomically; a failed write (disk full, permissions) leaves the finished shards in place and
    no partial file behind, and says so."""
    from safetensors.torch import save_file

    target = out / _shard_name(j)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=out, prefix=_TMP_PREFIX, suffix=".tmp")
        os.close(fd)
        save_file(tensors, tmp, metadata={"vitdecomp": json.dumps(shard_meta)})
        os.replace(tmp, target)
    except OSError as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise OutputError(
            f"cannot write {target}: {exc.strerror or exc}. The {kept} shards finished before it are kept; free "
            "space (or fix the permissions) and rerun extract with the same arguments to continue"
        ) from exc
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def _raise_nonfinite(contribs, reps, targets, rows, items, dtype_name) -> None:
    """Name the first image whose stored contributions (or representation, or CLIP target) are not finite, and say
    whether it is NaN/Inf from the model or an overflow of the storage dtype."""
    for b, (c, z, idx) in enumerate(zip(contribs, reps, rows)):
        bad = ~torch.isfinite(c.float()).flatten(1).all(1)
        if bool(bad.any()):
            r = int(torch.nonzero(bad)[0])
            if not bool(torch.isfinite(z[r]).all()):
                kind = "NaN" if bool(torch.isnan(z[r]).any()) else "Inf"
                raise InputError(f"the decomposition of {items.name(idx[r])} (batch {b} of its shard) contains {kind} "
                                 "(the image or the model produced non-finite values); check that image and the "
                                 "model's weights")
            raise InputError(f"contributions of {items.name(idx[r])} (batch {b} of its shard) overflow {dtype_name} "
                             "(|value| beyond its range); extract with dtype=torch.float32")
    for b, (t, idx) in enumerate(zip(targets, rows)):
        bad = ~torch.isfinite(t).all(1)
        if bool(bad.any()):
            raise InputError(f"the CLIP target of {items.name(idx[int(torch.nonzero(bad)[0])])} (batch {b} of its "
                             "shard) is not finite; check that image and the CLIP model's weights")
    raise InputError(f"contributions overflow {dtype_name}; extract with dtype=torch.float32")


def _resumable(f: Path, j: int, settings: dict, digest: str, items) -> bool:
    """True when shard file ``f`` is a finished, intact shard of this extraction (and its images are unchanged);
    False when it is missing or corrupt (it is then re-extracted); MismatchError when it belongs to another one."""
    if not f.exists():
        return False
    import warnings

    try:
        header = _read_header(f)
        _check_header(f, header, j, settings, digest)
        _verify_file(f, header)
    except CorruptCacheError as exc:
        warnings.warn(f"{exc} — re-extracting it", stacklevel=3)
        return False
    for i, d in zip(range(header["start"], header["stop"]), header["inputs"]):
        if d is None:  # skipped when the shard was written
            continue
        try:
            now = items.digest(i)
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"{items.name(i)} cannot be read to verify shard {f}: {exc}") from exc
        if now != d:
            raise MismatchError(
                f"{items.name(i)} is not the image shard {f} was made from (its content changed); the cache was "
                "made from other data (a dataset with random transforms yields other samples at every read: make "
                "it deterministic). Extract into another folder, or rerun with resume=False (--no-resume)"
            )
    return True


def _prepare_cache(out: Path, meta_file: Path, settings: dict, resume: bool) -> dict:
    """Check an existing cache against ``settings`` (resume) or reset it; return the metadata to continue with.
    Only files extract wrote are touched (the folder was claimed by :func:`_claim`)."""
    for tmp in out.iterdir():
        if _is_ours(tmp):
            tmp.unlink(missing_ok=True)
    meta = None
    if meta_file.exists():
        if resume:
            try:
                meta = _read_meta(out)
            except CorruptCacheError:
                import warnings

                warnings.warn(f"{meta_file} is broken; rebuilding it (the shards are verified one by one)",
                              stacklevel=3)
                meta = None
            if meta is not None:
                _compare(meta, settings, out)
        else:
            for f in out.glob("shard-*.safetensors"):
                f.unlink()
            meta_file.unlink()
    elif not resume:
        for f in out.glob("shard-*.safetensors"):
            f.unlink()
    if meta is None:
        meta = {**settings, "names": None, "dim": None, "target_dim": None, "complete": False}
        _atomic_write_json(meta_file, meta)
    return meta
