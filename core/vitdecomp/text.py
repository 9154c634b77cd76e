"""Text embeddings for CompAttribute and TextSpan (METHOD.md §3).

Each description is put into the 80 ImageNet prompt templates of CLIP (``open_clip.zero_shot_metadata``,
imported, not copied), every prompt is encoded and L2-normalised, the prompts of one description are averaged and
the mean is re-normalised:

    e(t) = normalise( (1/80) Σ_k normalise(CLIP_text(template_k(t))) )

This is the zero-shot classifier construction of Radford et al. (2021) that Balasubramanian et al. (2024, §3.2) and
Gandelsman et al. (2024) use for property descriptions and text pools. ``templates=None`` encodes the raw text
(one prompt per description).

Embeddings are cached in memory and, with ``cache_dir``, on disk (one safetensors file per model identity and
template set, keyed by the SHA-256 of the text). The model identity is its name plus a fingerprint of its text-tower
weights, so two differently initialised models with the same name never share a cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import attrs
import torch

from .errors import EmptyDatasetError, InputError, UnknownModelError, WeightsUnavailableError

__all__ = ["TextEncoder", "load_text_pool", "DEFAULT_TEXT_POOL", "model_fingerprint"]

#: The default TextSpan pool shipped with vitdecomp (written for this project; see data/make_textpool.py).
DEFAULT_TEXT_POOL = Path(__file__).parent / "data" / "textpool.txt"

TemplateSpec = Union[None, str, Sequence[Union[str, Callable[[str], str]]]]


def _named_templates(name: str):
    from open_clip import zero_shot_metadata as z

    table = {"imagenet": z.OPENAI_IMAGENET_TEMPLATES, "simple": z.SIMPLE_IMAGENET_TEMPLATES}
    if name not in table:
        raise InputError(f"Unknown template set {name!r}; use 'imagenet' (80 templates), 'simple' or None (raw text)")
    return table[name]


def _resolve_templates(templates: TemplateSpec):
    """(list of callables, identity string) for a template spec."""
    if templates is None:
        return [lambda c: c], "raw"
    if isinstance(templates, str):
        return list(_named_templates(templates)), templates
    funcs = []
    for t in templates:
        if callable(t):
            funcs.append(t)
        elif isinstance(t, str) and "{}" in t:
            funcs.append(t.format)
        else:
            raise InputError(f"A template must be a callable or a string containing '{{}}', got {t!r}")
    if not funcs:
        raise InputError("templates is an empty sequence; use None for raw text")
    rendered = "\n".join(f("{}") for f in funcs)
    return funcs, "custom-" + hashlib.sha256(rendered.encode()).hexdigest()[:16]


def model_fingerprint(model: torch.nn.Module, *, exclude_prefix: str = "visual.", sample: int = 512) -> str:
    """A short hex digest of a model's weights (names, shapes and a sample of values of each tensor).

    Parameters whose names start with ``exclude_prefix`` are skipped (the image tower for text caches).
    """
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if exclude_prefix and name.startswith(exclude_prefix):
            continue
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        if t.is_floating_point() and t.numel():
            flat = t.detach().reshape(-1)
            step = max(1, flat.numel() // sample)
            vals = flat[::step][:sample].to("cpu", torch.float64)
            h.update(vals.numpy().tobytes())
            h.update(repr(float(flat.to(torch.float64).sum())).encode())
    return h.hexdigest()[:16]


def _safe_filename(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)[:120]


def _text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


@attrs.define(eq=False)
class TextEncoder:
    """Encode descriptions with an open_clip model's text tower (``tokenizer`` + ``encode_text``).

    Build one with :meth:`from_pretrained` (open_clip name and pretrained tag or checkpoint path) or
    :meth:`from_model` (a model you already have). :meth:`encode` returns L2-normalised float32 embeddings on the CPU.
    """

    model: torch.nn.Module
    tokenizer: Callable
    name: str
    device: torch.device = attrs.field(converter=torch.device, default="cpu")
    cache_dir: Optional[Path] = attrs.field(default=None, converter=attrs.converters.optional(Path))
    batch_size: int = 256
    progress: bool = True
    identity: str = attrs.field(init=False)
    _memory: Dict[tuple, torch.Tensor] = attrs.field(init=False, factory=dict)
    _disk_loaded: set = attrs.field(init=False, factory=set)

    def __attrs_post_init__(self):
        if not hasattr(self.model, "encode_text"):
            raise InputError(
                f"TextEncoder needs an open_clip model with encode_text; got {type(self.model).__name__}"
            )
        self.identity = f"{self.name}#{model_fingerprint(self.model)}"

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, model_name: str, pretrained: Optional[str] = None, *, device="cpu",
                        cache_dir=None, **kwargs) -> "TextEncoder":
        """Load an open_clip model and its tokenizer.

        ``model_name``: an open_clip architecture (``"ViT-L-14"``), optionally with the tag after a slash
        (``"ViT-L-14/laion2b_s32b_b82k"``) and an ``open_clip:`` prefix. ``pretrained``: a tag or a checkpoint
        path; ``None`` gives random weights (tests). Extra keyword arguments go to
        ``open_clip.create_model_and_transforms``.
        """
        import open_clip

        spec = model_name[len("open_clip:"):] if model_name.startswith("open_clip:") else model_name
        if pretrained is None and "/" in spec and not spec.startswith(("hf-hub:", "local-dir:")):
            spec, pretrained = spec.split("/", 1)
        known = open_clip.list_models()
        if not spec.startswith(("hf-hub:", "local-dir:")) and spec not in known:
            raise UnknownModelError(
                f"open_clip has no model {spec!r}; known architectures include {known[:12]} ... "
                f"({len(known)} in all, see open_clip.list_models())"
            )
        try:
            model, _, _ = open_clip.create_model_and_transforms(spec, pretrained=pretrained, device=device, **kwargs)
        except RuntimeError as exc:
            if pretrained is not None:
                raise WeightsUnavailableError(
                    f"Could not load weights {pretrained!r} for open_clip model {spec!r}: {exc}. "
                    "Without internet, pass the path of a local checkpoint as pretrained=..."
                ) from exc
            raise
        model.eval()
        tokenizer = open_clip.get_tokenizer(spec)
        name = f"open_clip:{spec}" + (f"/{pretrained}" if pretrained else "")
        return cls(model, tokenizer, name, device=device, cache_dir=cache_dir)

    @classmethod
    def from_model(cls, model, tokenizer=None, *, name: Optional[str] = None, device=None,
                   cache_dir=None) -> "TextEncoder":
        """Wrap an open_clip model you already have (or a :class:`vitdecomp.LoadedModel` holding one).

        ``tokenizer`` defaults to open_clip's BPE tokenizer with the model's context length.
        """
        if not hasattr(model, "encode_text") and hasattr(model, "model"):  # a LoadedModel
            name = name or getattr(model, "name", None)
            tokenizer = tokenizer or getattr(model, "tokenizer", None)
            model = model.model
        if tokenizer is None:
            import open_clip

            tokenizer = open_clip.SimpleTokenizer(context_length=getattr(model, "context_length", 77))
        if device is None:
            p = next(iter(model.parameters()), None)
            device = p.device if p is not None else "cpu"
        name = name or type(model).__name__
        return cls(model.eval(), tokenizer, name, device=device, cache_dir=cache_dir)

    # ------------------------------------------------------------------ encoding
    @property
    def dim(self) -> int:
        """Embedding dimension d."""
        proj = getattr(self.model, "text_projection", None)
        if isinstance(proj, torch.Tensor):
            return proj.shape[-1]
        if isinstance(proj, torch.nn.Linear):
            return proj.out_features
        return int(self.encode(["a"], templates=None).shape[-1])

    def _disk_path(self, tkey: str) -> Optional[Path]:
        if self.cache_dir is None:
            return None
        return self.cache_dir / f"{_safe_filename(self.identity)}__{tkey}.safetensors"

    def _load_disk(self, tkey: str) -> None:
        path = self._disk_path(tkey)
        if path is None or tkey in self._disk_loaded:
            return
        self._disk_loaded.add(tkey)
        if not path.exists():
            return
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata().get("vitdecomp", "{}"))
            if meta.get("identity") != self.identity:
                return  # a hash collision of file names; ignore rather than mix models
            texts = meta.get("texts", {})
            for key in f.keys():
                if key in texts:
                    self._memory[(tkey, texts[key])] = f.get_tensor(key)

    def _save_disk(self, tkey: str) -> None:
        path = self._disk_path(tkey)
        if path is None:
            return
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        items = {text: emb for (k, text), emb in self._memory.items() if k == tkey}
        tensors = {_text_key(t): e.contiguous() for t, e in items.items()}
        meta = {"identity": self.identity, "templates": tkey, "texts": {_text_key(t): t for t in items}}
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"vitdecomp": json.dumps(meta)})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @torch.no_grad()
    def _encode_prompts(self, prompts: List[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts).to(self.device)
        emb = self.model.encode_text(tokens).float()
        return torch.nn.functional.normalize(emb, dim=-1)

    def encode(self, descriptions: Sequence[str], *, templates: TemplateSpec = "imagenet",
               progress: Optional[bool] = None) -> torch.Tensor:
        """Embeddings ``[P, d]`` (float32, CPU, unit norm) of ``descriptions``.

        ``templates``: ``"imagenet"`` (CLIP's 80 ImageNet prompts, the default), ``"simple"``, ``None`` (raw
        text) or a sequence of ``"... {} ..."`` strings / callables.
        """
        if isinstance(descriptions, str):
            raise InputError("encode() takes a list of descriptions, not a single string; wrap it in a list")
        descriptions = list(descriptions)
        for d in descriptions:
            if not isinstance(d, str) or not d.strip():
                raise InputError(f"Every description must be a non-empty string, got {d!r}")
        funcs, tkey = _resolve_templates(templates)
        self._load_disk(tkey)
        missing = list(dict.fromkeys(d for d in descriptions if (tkey, d) not in self._memory))
        if missing:
            from tqdm.auto import tqdm

            T = len(funcs)
            per_chunk = max(1, self.batch_size // T)
            chunks = [missing[i:i + per_chunk] for i in range(0, len(missing), per_chunk)]
            show = self.progress if progress is None else progress
            for chunk in tqdm(chunks, desc="encoding texts", unit="batch", disable=not show or len(chunks) < 2):
                prompts = [f(d) for d in chunk for f in funcs]
                emb = self._encode_prompts(prompts).reshape(len(chunk), T, -1).mean(1)
                emb = torch.nn.functional.normalize(emb, dim=-1).cpu()
                for d, e in zip(chunk, emb):
                    self._memory[(tkey, d)] = e.clone()
            self._save_disk(tkey)
        if not descriptions:
            return torch.zeros(0, self.dim)
        return torch.stack([self._memory[(tkey, d)] for d in descriptions])

    def clear_cache(self) -> None:
        """Forget the in-memory cache (the on-disk cache is kept)."""
        self._memory.clear()
        self._disk_loaded.clear()


def load_text_pool(path=None) -> List[str]:
    """Read a text pool for TextSpan: one description per line; blank lines and ``#`` comments are skipped and
    duplicates removed (first occurrence kept).

    ``path=None`` reads vitdecomp's default pool (:data:`DEFAULT_TEXT_POOL`, a few thousand short image
    descriptions written for this project).
    """
    p = Path(path) if path is not None else DEFAULT_TEXT_POOL
    if not p.is_file():
        raise InputError(f"Text pool file {p} does not exist")
    lines = []
    with open(p, encoding="utf-8") as f:
        for line in f:
            s = line.strip()
            if s and not s.startswith("#"):
                lines.append(s)
    out = list(dict.fromkeys(lines))
    if not out:
        raise EmptyDatasetError(f"Text pool file {p} contains no descriptions")
    return out
