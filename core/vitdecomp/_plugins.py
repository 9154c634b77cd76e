"""Plugin discovery (entry points, group ``vitdecomp``), the registry of adapters/loaders, and dispatch."""

from __future__ import annotations

import importlib.metadata as md
import logging
import os
import sys
import threading
import warnings
from typing import Callable, Dict, Iterable, List, Optional

import attrs
import pluggy

from . import hookspecs
from .errors import AmbiguousAdapterError, NoAdapterError, PluginLoadError

__all__ = ["Registry", "PluginInfo", "AdapterChoice", "default_registry", "list_plugins", "reset_default_registry"]

log = logging.getLogger("vitdecomp.plugins")
ENTRY_POINT_GROUP = "vitdecomp"
DISABLE_ENV = "VITDECOMP_DISABLE_PLUGINS"
TRACE_ENV = "VITDECOMP_TRACE"
BUILTIN_DISTRIBUTION = "vitdecomp"


@attrs.frozen
class PluginInfo:
    """One loaded plugin: entry-point name, distribution, version, the families its adapters cover."""

    name: str
    distribution: str
    version: str
    families: tuple
    adapters: tuple
    loaders: tuple
    builtin: bool


@attrs.frozen
class AdapterChoice:
    """Which adapter decomposes a model and why (:meth:`Registry.choose`, what ``vitdecomp check`` prints).

    ``adapter``: the adapter object; ``origin``: the plugin that registered it; ``how``: ``"override"`` (passed as
    ``adapter=``), ``"claimed"`` (the one family adapter whose ``supports`` said yes) or ``"fallback"`` (no family
    adapter claimed it and a fallback adapter such as ``auto`` did); ``reason``: one line saying why;
    ``claims``: ``[(adapter name, plugin origin, claims?, explanation)]`` for every adapter asked (empty for an
    override, which asks none).
    """

    adapter: object
    origin: str
    how: str
    reason: str
    claims: tuple = ()

    @property
    def name(self) -> str:
        return self.adapter.name

    def lines(self) -> List[str]:
        """The choice as text: the adapter, how it was chosen, then one line per adapter asked."""
        out = [f"adapter {self.name!r} [{self.origin}] ({self.how}): {self.reason}"]
        for name, origin, ok, why in self.claims:
            out.append(f"  {'CLAIMS' if ok else 'no    '}  {name}  [{origin}]  {why}")
        return out


@attrs.frozen
class _Registered:
    obj: object
    plugin: str


def _disabled_from_env() -> set:
    raw = os.environ.get(DISABLE_ENV, "")
    return {p.strip() for p in raw.split(",") if p.strip()}


class Registry:
    """Adapters, model loaders and properties contributed by a set of plugins.

    Build one from installed entry points with :meth:`from_entry_points` or from explicit plugin objects with
    :meth:`from_plugins` (tests do this; ``Registry.from_plugins([])`` is a registry with no plugins).
    """

    def __init__(self, pm: pluggy.PluginManager, dists: Optional[Dict[str, tuple]] = None, *, lenient: bool = False):
        self.pm = pm
        self._dists = dists or {}
        self.lenient = lenient
        self.adapters: List[_Registered] = []
        self.loaders: Dict[str, _Registered] = {}
        self.properties: Dict[str, _Registered] = {}
        #: plugins dropped in lenient mode, with the reason: ``{entry-point name: message}``
        self.dropped: Dict[str, str] = {}
        self._collect()

    # ---------------------------------------------------------------- construction
    @staticmethod
    def _new_pm() -> pluggy.PluginManager:
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        return pm

    @classmethod
    def from_plugins(cls, plugins: Iterable[object] = (), *, lenient: bool = False,
                     dists: Optional[Dict[str, tuple]] = None) -> "Registry":
        """A registry of explicit plugin objects (``dists``: ``{plugin name: (distribution, version)}`` for
        messages and for telling built-ins apart)."""
        pm = cls._new_pm()
        for p in plugins:
            pm.register(p, name=getattr(p, "__name__", None))
        pm.check_pending()
        return cls(pm, dists, lenient=lenient)

    @classmethod
    def from_entry_points(cls, *, lenient: bool = False, disabled: Optional[Iterable[str]] = None) -> "Registry":
        """Load every entry point of group ``vitdecomp``.

        A plugin that fails to import raises :class:`PluginLoadError` naming its distribution, version and
        entry point; with ``lenient=True`` it is skipped with a warning instead. ``disabled`` names (plus the
        comma-separated environment variable ``VITDECOMP_DISABLE_PLUGINS``) are not loaded.
        """
        pm = cls._new_pm()
        skip = set(disabled or ()) | _disabled_from_env()
        dists: Dict[str, tuple] = {}

        def origin(ep):
            dist = getattr(ep, "dist", None)
            return (dist.metadata["Name"], dist.version) if dist is not None else ("?", "?")

        # built-ins first: in a name clash the newcomer (a third-party pack) is the one blamed and dropped
        eps = sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (origin(e)[0] != BUILTIN_DISTRIBUTION,
                                                                              e.name))
        for ep in eps:
            dname, dver = origin(ep)
            if ep.name in skip or dname in skip:
                log.info("plugin %s (%s %s) disabled", ep.name, dname, dver)
                continue
            if pm.has_plugin(ep.name):
                other = dists.get(ep.name, ("?", "?"))
                err = PluginLoadError(
                    f"Entry point name {ep.name!r} of distribution {dname} {dver} is already used by "
                    f"{other[0]} {other[1]}; plugin names must be unique across installed packs"
                )
                if lenient:
                    warnings.warn(str(err), RuntimeWarning, stacklevel=2)
                    continue
                raise err
            try:
                obj = ep.load()
                pm.register(obj, name=ep.name)
            except Exception as exc:  # noqa: BLE001 - any failure of third-party code is reported the same way
                err = PluginLoadError(
                    f"Plugin {ep.name!r} (distribution {dname} {dver}, entry point {ep.value!r} in group "
                    f"{ENTRY_POINT_GROUP!r}) failed to load: {type(exc).__name__}: {exc}"
                )
                err.__cause__ = exc
                if lenient:
                    warnings.warn(str(err), RuntimeWarning, stacklevel=2)
                    continue
                raise err
            dists[ep.name] = (dname, dver)
        try:
            pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginLoadError(f"A plugin implements a hook that does not exist: {exc}") from exc
        return cls(pm, dists, lenient=lenient)

    def _is_builtin(self, plugin: str) -> bool:
        return self._dists.get(plugin, ("",))[0] == BUILTIN_DISTRIBUTION

    def origin(self, plugin: str) -> str:
        """``plugin 'name' (distribution version)``, marked built-in where it is one."""
        d = self._dists.get(plugin)
        where = f" ({d[0]} {d[1]}{', built-in' if d[0] == BUILTIN_DISTRIBUTION else ''})" if d else ""
        return f"plugin {plugin!r}{where}"

    def _collect(self) -> None:
        """Run every plugin's hooks, one plugin at a time and built-ins first. A plugin whose hook raises or whose
        registrations clash with earlier ones is a :class:`PluginLoadError` naming it; in lenient mode it is
        dropped as a whole (with a warning) and the others stay."""
        names = [n for n, _ in self.pm.list_name_plugin()]
        order = sorted(names, key=lambda n: not self._is_builtin(n))  # stable: otherwise in loading order
        hooks = (("register_adapters", "adapter"), ("register_model_loaders", "loader"),
                 ("register_properties", "property"))
        impls: Dict[str, list] = {n: [] for n in names}
        for hook, what in hooks:
            for impl in getattr(self.pm.hook, hook).get_hookimpls():
                impls.setdefault(impl.plugin_name, []).append((hook, what, impl))
        for name in order:
            staged = {"adapter": [], "loader": {}, "property": {}}
            try:
                for hook, what, impl in impls.get(name, ()):
                    try:
                        impl.function(register=self._adder(name, what, staged))
                    except PluginLoadError:
                        raise
                    except Exception as exc:  # noqa: BLE001 - third-party code: named, then raised or dropped
                        raise PluginLoadError(
                            f"{self.origin(name)}: its hook {hook} raised {type(exc).__name__}: {exc}"
                        ) from exc
            except PluginLoadError as err:
                if not self.lenient:
                    raise
                warnings.warn(f"{err} — skipping this plugin (lenient mode)", RuntimeWarning, stacklevel=3)
                self.dropped[name] = str(err)
                self.pm.unregister(name=name)
                continue
            self.adapters.extend(staged["adapter"])
            self.loaders.update(staged["loader"])
            self.properties.update(staged["property"])

    def _adder(self, plugin: str, what: str, staged: dict) -> Callable:
        me = self.origin(plugin)

        def taken(other: str) -> str:
            return "itself" if other == plugin else self.origin(other)

        def register_adapter(adapter):
            for attr in ("name", "supports", "decompose", "representation"):
                if not hasattr(adapter, attr):
                    raise PluginLoadError(f"{me} registered an adapter without {attr!r}: {adapter!r}")
            for r in self.adapters + staged["adapter"]:
                if r.obj.name == adapter.name:
                    raise PluginLoadError(f"{me} registered adapter name {adapter.name!r}, already taken by "
                                          f"{taken(r.plugin)}; adapter names must be unique")
            staged["adapter"].append(_Registered(adapter, plugin))

        def register_loader(prefix, loader):
            other = self.loaders.get(prefix) or staged["loader"].get(prefix)
            if other is not None:
                raise PluginLoadError(f"{me} registered loader prefix {prefix!r}, already taken by "
                                      f"{taken(other.plugin)}; choose another prefix")
            staged["loader"][prefix] = _Registered(loader, plugin)

        def register_property(name, descriptions):
            from .properties import BUILTIN_PROPERTIES

            if name in BUILTIN_PROPERTIES:
                raise PluginLoadError(f"{me} registered property {name!r}, which is a built-in property; choose "
                                      f"another name (built-ins: {sorted(BUILTIN_PROPERTIES)})")
            other = self.properties.get(name) or staged["property"].get(name)
            if other is not None:
                raise PluginLoadError(f"{me} registered property {name!r}, already taken by {taken(other.plugin)}")
            staged["property"][name] = _Registered(tuple(descriptions), plugin)

        return {"adapter": register_adapter, "loader": register_loader, "property": register_property}[what]

    def plugin_of(self, adapter) -> Optional[str]:
        """The origin (:meth:`origin`) of the plugin that registered ``adapter``, or None."""
        for r in self.adapters:
            if r.obj is adapter:
                return self.origin(r.plugin)
        return None

    def claims(self, model) -> List[tuple]:
        """``[(adapter name, plugin origin, claims?, explanation)]`` for every registered adapter and ``model``
        (what ``vitdecomp plugins --check MODEL`` prints). Fallback adapters (``fallback = True``, e.g.
        ``auto``) are listed last; they are used only when no other adapter claims the model."""
        out = []
        for r in sorted(self.adapters, key=lambda r: bool(getattr(r.obj, "fallback", False))):
            try:
                ok = bool(r.obj.supports(model))
                why = r.obj.explain(model) if hasattr(r.obj, "explain") else f"supports={ok}"
            except Exception as exc:  # noqa: BLE001 - a buggy supports() is reported, not raised
                log.warning("adapter %s.supports raised %r", r.obj.name, exc)
                ok, why = False, f"supports() raised {type(exc).__name__}: {exc}"
            out.append((r.obj.name, self.origin(r.plugin), ok, why))
        return out

    # ---------------------------------------------------------------- queries
    def plugins(self) -> List[PluginInfo]:
        out = []
        for name, plugin in self.pm.list_name_plugin():
            adapters = tuple(r.obj for r in self.adapters if r.plugin == name)
            dname, dver = self._dists.get(name, ("(registered directly)", "-"))
            out.append(PluginInfo(
                name=name, distribution=dname, version=dver,
                families=tuple(f for a in adapters for f in getattr(a, "families", ())),
                adapters=tuple(a.name for a in adapters),
                loaders=tuple(p for p, r in self.loaders.items() if r.plugin == name),
                builtin=dname == BUILTIN_DISTRIBUTION,
            ))
        return out

    def adapter_named(self, name: str):
        for r in self.adapters:
            if r.obj.name == name:
                return r.obj
        raise NoAdapterError(f"No adapter named {name!r}; registered: {[r.obj.name for r in self.adapters] or 'none'}")

    def find_adapter(self, model, adapter=None, *, trace: Optional[bool] = None):
        """The one adapter that supports ``model``, or the one named/passed by ``adapter``
        (:meth:`choose` says why)."""
        return self.choose(model, adapter, trace=trace).adapter

    def choose(self, model, adapter=None, *, trace: Optional[bool] = None) -> AdapterChoice:
        """Which adapter decomposes ``model``, how it was chosen and what every adapter said
        (:class:`AdapterChoice`).

        ``adapter`` (a name or an adapter object) overrides dispatch and asks no one. Otherwise every adapter's
        ``supports`` is asked: exactly one family adapter claiming the model wins; if none does, a fallback
        adapter (``fallback = True``, e.g. ``auto``) that claims it is used; no claim at all is a
        :class:`NoAdapterError` and several family claims an :class:`AmbiguousAdapterError`.
        """
        if adapter is not None:
            obj = self.adapter_named(adapter) if isinstance(adapter, str) else adapter
            origin = self.plugin_of(obj) or "passed directly"
            return AdapterChoice(obj, origin, "override", f"adapter={getattr(obj, 'name', obj)!r} was passed; "
                                 "no adapter was asked")
        trace = bool(os.environ.get(TRACE_ENV)) if trace is None else trace
        claims = self.claims(model)
        by_name = {r.obj.name: r for r in self.adapters}
        if trace:
            for name, origin, ok, why in claims:
                print(f"[vitdecomp trace] {by_name[name].plugin}:{name} -> {ok} ({why})", file=sys.stderr)
        regular = [c for c in claims if c[2] and not getattr(by_name[c[0]].obj, "fallback", False)]
        fallback = [c for c in claims if c[2] and getattr(by_name[c[0]].obj, "fallback", False)]
        cls = type(model)
        cname = f"{cls.__module__}.{cls.__qualname__}"
        if len(regular) > 1:
            raise AmbiguousAdapterError(
                f"Several adapters claim model class {cname}: {[c[0] for c in regular]}. "
                f"Pass adapter=<name> to choose one."
            )
        if regular:
            name, origin, _, why = regular[0]
            return AdapterChoice(by_name[name].obj, origin, "claimed", why, tuple(claims))
        if fallback:
            name, origin, _, why = fallback[0]
            return AdapterChoice(by_name[name].obj, origin, "fallback",
                                 f"no family adapter claims {cls.__qualname__}; {why}", tuple(claims))
        names = [f"{r.obj.name} ({', '.join(getattr(r.obj, 'families', ())) or r.plugin})" for r in self.adapters]
        raise NoAdapterError(
            f"No adapter supports model class {cname}. Registered adapters: {names or 'none (no plugins loaded)'}. "
            "Install a model pack for this family or write one (see CONTRIBUTING.md, 'Writing a model pack')."
        )

    def loader_for(self, prefix: str):
        from .errors import UnknownModelError

        if prefix not in self.loaders:
            raise UnknownModelError(
                f"No model loader for prefix {prefix!r}; registered prefixes: {sorted(self.loaders) or 'none'}. "
                "Model strings look like 'timm:deit_base_patch16_224' or 'open_clip:ViT-B-16/laion2b_s34b_b88k'."
            )
        return self.loaders[prefix].obj


_default: Optional[Registry] = None
_lock = threading.Lock()


def default_registry() -> Registry:
    """The registry of installed plugins, built on first use (importing vitdecomp loads nothing)."""
    global _default
    with _lock:
        if _default is None:
            lenient = os.environ.get("VITDECOMP_LENIENT_PLUGINS", "") not in ("", "0")
            _default = Registry.from_entry_points(lenient=lenient)
        return _default


def reset_default_registry(registry: Optional[Registry] = None) -> None:
    """Forget (or replace) the cached default registry."""
    global _default
    with _lock:
        _default = registry


def list_plugins(registry: Optional[Registry] = None) -> List[PluginInfo]:
    """Name, distribution, version and families of every loaded plugin."""
    return (registry or default_registry()).plugins()
