"""The plugin manager: built-in plugins and installed ones (entry-point group `inpaint_worker`), alike."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pluggy
from pydantic import ValidationError

from . import hooks
from .errors import InvalidRequest, JobError, PluginError, describe_invalid

log = logging.getLogger(__name__)

# What a plugin's code may raise without taking the worker down: a `sys.exit()` in a hook or at import too
# (SystemExit escaping a job leaves Celery's pool thread with its message neither acked nor failed).
PLUGIN_FAULTS = (Exception, SystemExit)
ENTRY_POINT_GROUP = "inpaint_worker"
HOOK_NAMES = sorted(name for name in vars(hooks) if name.startswith("inpaint_"))
DEFAULT_PLUGINS = (
    "worker.builtin.normalize",
    "worker.builtin.mask",
    "worker.builtin.auto_crop",
    "worker.builtin.cancel",
    "worker.builtin.deadline",
    "worker.builtin.preview",
    "worker.builtin.progress",
    "worker.builtin.paste_back",
)
# built-ins a request cannot turn off, and why (an operator can still block them)
ALWAYS_ON = {
    "cancel": "a cancelled job must stop",
    "deadline": "every job must end by its deadline, before Redis hands it to a second worker",
    "normalize": "the pipeline needs RGB inputs at a size the model takes",
    "mask": "the pipeline needs the mask as grayscale at the image's size",
}


@dataclass
class LoadReport:
    blocked: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    origin: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> kind, distribution, version


def builtin_name(module: str) -> str:
    return module.rsplit(".", 1)[-1]


class Plugins:
    """Holds the registered plugins and calls hooks, naming the plugin when one raises."""

    def __init__(self, blocked: Iterable[str] = (), load_entry_points: bool = True,
                 builtins: Iterable[str] = DEFAULT_PLUGINS):
        self.pm = pluggy.PluginManager(hooks.PROJECT)
        self.pm.add_hookspecs(hooks)
        self.blocked = set(blocked)
        self.report = LoadReport()
        for module in builtins:
            self.report.origin[builtin_name(module)] = {"kind": "built-in", "distribution": "qwen-inpaint-worker",
                                                        "version": _version("qwen-inpaint-worker")}
            self._register_module(builtin_name(module), module)
        if load_entry_points:
            self._load_entry_points()

    def _register_module(self, name: str, module: str) -> None:
        if name in self.blocked:
            self.report.blocked.append(name)
            return
        try:
            self._register(importlib.import_module(module), name)
        except PLUGIN_FAULTS as error:  # a broken plugin never stops the worker
            self._skip(name, error)

    def _register(self, plugin: Any, name: str) -> None:
        """Register, then refuse what would silently never run: misspelled hooks and hook wrappers."""
        self.pm.register(plugin, name=name)
        callers = self.pm.get_hookcallers(plugin) or []
        unknown = sorted(caller.name for caller in callers if not caller.has_spec())
        wrappers = sorted(impl.function.__name__ for caller in callers for impl in caller.get_hookimpls()
                          if impl.plugin is plugin and (impl.hookwrapper or impl.wrapper))
        if unknown or wrappers:
            self.pm.unregister(plugin)
            raise TypeError(f"unknown hooks {unknown} (the hooks: {HOOK_NAMES})" if unknown else
                            f"hook wrappers are not supported ({wrappers}): implement the hook itself")

    def _load_entry_points(self) -> None:
        from importlib.metadata import entry_points

        for entry in entry_points(group=ENTRY_POINT_GROUP):
            dist = getattr(entry, "dist", None)
            if self.pm.has_plugin(entry.name):  # the registered one keeps its name and listing
                source = dist.name if dist else "?"
                self._skip(f"{entry.name} (from {source})", RuntimeError(
                    f"a plugin named {entry.name!r} is already registered; {source} cannot take the name"))
                continue
            self.report.origin[entry.name] = {"kind": "installed", "distribution": dist.name if dist else "?",
                                              "version": dist.version if dist else "?"}
            if entry.name in self.blocked:
                self.report.blocked.append(entry.name)
                continue
            try:
                self._register(entry.load(), entry.name)
            except PLUGIN_FAULTS as error:
                self._skip(entry.name, error)

    def _skip(self, name: str, error: BaseException) -> None:
        self.report.failed[name] = f"{type(error).__name__}: {error}"
        log.error("plugin %r failed to load and is skipped: %s", name, self.report.failed[name])

    def register(self, plugin: Any, name: str) -> None:
        """Register a plugin object directly (tests, embedding applications); a taken name is a ValueError."""
        if self.pm.has_plugin(name) or name in self.report.failed or name in self.report.blocked:
            raise ValueError(f"a plugin named {name!r} is already listed; register it under another name")
        if name in self.blocked:
            self.report.blocked.append(name)
            return
        self.report.origin.setdefault(name, {"kind": "registered", "distribution": "-", "version": "-"})
        try:
            self._register(plugin, name)
        except Exception as error:
            self._skip(name, error)

    def pipeline_loaded(self, pipe: Any, settings: Any) -> None:
        """`inpaint_pipeline_loaded`, plugin by plugin: one that raises is reported and skipped, the others run."""
        for impl in in_order(self.pm.hook.inpaint_pipeline_loaded.get_hookimpls()):
            try:
                impl.function(**{arg: {"pipe": pipe, "settings": settings}[arg] for arg in impl.argnames})
            except PLUGIN_FAULTS as error:
                self.pm.unregister(name=impl.plugin_name)
                self._skip(impl.plugin_name, error)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.pm.list_name_plugin()]

    def describe(self) -> list[dict[str, object]]:
        """Every plugin seen: name, status (active, blocked, failed), where it comes from, its hooks."""
        rows = [{"name": name, "status": "active", "hooks": self.hooks_of(name)} for name in self.names]
        rows += [{"name": name, "status": "blocked", "hooks": []} for name in self.report.blocked]
        rows += [{"name": name, "status": "failed", "error": why, "hooks": []}
                 for name, why in self.report.failed.items()]
        return [{**row, **self.report.origin.get(str(row["name"]), {})} for row in rows]

    def hooks_of(self, name: str) -> list[str]:
        plugin = self.pm.get_plugin(name)
        return sorted(caller.name for caller in self.pm.get_hookcallers(plugin) or [])

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Each active plugin's options for a job: the request's, validated by the plugin's `Options` model,
        or the model's defaults (which may come from the environment)."""
        validated = {}
        for name, value in options.items():
            plugin = self.pm.get_plugin(name)
            if plugin is None and name in self.report.blocked:
                log.warning("options for plugin %r are ignored: the operator blocked it", name)
                continue
            if plugin is None:
                raise InvalidRequest(f"plugins.{name}", f"no plugin of that name is active; active: {self.names}")
            if value is False and name in ALWAYS_ON:
                raise InvalidRequest(f"plugins.{name}", f"cannot be turned off by a request: {ALWAYS_ON[name]}; "
                                     "give options instead, or none")
            if value is False and not getattr(plugin, "request_may_disable", lambda: True)():
                raise InvalidRequest(f"plugins.{name}", "cannot be turned off by a request: this worker's operator "
                                     "requires it on every job")
            model = getattr(plugin, "Options", None)
            if value is False or model is None:
                validated[name] = value
                continue
            self._operator_defaults(name, model)  # a bad environment is the operator's error, not the request's
            try:
                validated[name] = model.model_validate(value if isinstance(value, dict) else {})
            except ValidationError as error:
                raise InvalidRequest(*describe_invalid(error, option_field(name))) from None
        for name in self.names:
            model = getattr(self.pm.get_plugin(name), "Options", None)
            if name not in validated and model is not None:
                validated[name] = self._operator_defaults(name, model)
        return validated

    @staticmethod
    def _operator_defaults(name: str, model: Any) -> Any:
        try:
            return model()
        except Exception as error:  # the operator's configuration, not the request, is wrong: told without the
            # values (pydantic quotes them, and an operator's default can be a secret from the environment)
            shown = ": ".join(describe_invalid(error, quote_input=False)) if isinstance(error, ValidationError) \
                else str(error)
            raise PluginError(name, "Options", ValueError(f"the operator's settings: {shown}")) from None

    def for_job(self, disabled: Iterable[str]) -> JobHooks:
        return JobHooks(self, [self.pm.get_plugin(n) for n in disabled if self.pm.get_plugin(n) is not None])


class JobHooks:
    """The hooks as one job sees them: without the plugins the request turned off.

    Implementations run in registration order (built-ins first, then installed plugins),
    `tryfirst`/`trylast` moving them to the front or back; each is called on its own so
    an error names its plugin.
    """

    def __init__(self, plugins: Plugins, removed: list[Any]):
        self.plugins = plugins
        self.removed = removed

    def _impls(self, name: str) -> list[Any]:
        return in_order(i for i in getattr(self.plugins.pm.hook, name).get_hookimpls() if i.plugin not in self.removed)

    def call(self, name: str, **kwargs: Any) -> None:
        """Call every implementation of a hook that returns nothing, in order; one that returns something
        (a replacement image, say: such hooks edit the job in place) fails the job naming it."""
        for impl in self._impls(name):
            returned = self._call_one(impl, name, kwargs)
            if returned is not None:
                raise PluginError(impl.plugin_name, name, TypeError(
                    f"returned an object of type {type(returned).__name__}; this hook returns None (edit the job in "
                    "place: job.image, job.mask, job.params)"))

    def chain(self, name: str, key: str, value: Any, accept: Callable[[Any, Any], Any], **kwargs: Any) -> Any:
        """Call each implementation with `key=value`; a non-None return, turned into the new value by
        `accept(returned, value)` (a TypeError there says what was expected), is what the next one sees."""
        for impl in self._impls(name):
            returned = self._call_one(impl, name, {**kwargs, key: value})
            if returned is not None:
                try:
                    value = accept(returned, value)
                except TypeError as error:
                    raise PluginError(impl.plugin_name, name, error) from None
        return value

    def notify(self, name: str, **kwargs: Any) -> None:
        """Call every implementation of a hook that tells of an outcome: one that raises is logged, naming its
        plugin, and neither stops the others nor changes the outcome."""
        for impl in self._impls(name):
            try:
                self._call_one(impl, name, kwargs)
            except PLUGIN_FAULTS:
                log.exception("plugin %r raised in %s (logged only: the job's outcome stands)", impl.plugin_name,
                              name)

    @staticmethod
    def _call_one(impl: Any, name: str, kwargs: dict[str, Any]) -> Any:
        try:
            return impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
        except JobError:
            raise
        except PLUGIN_FAULTS as error:
            if type(error).__name__ == "OutOfMemoryError":  # torch's: the job's memory, not the plugin's fault
                raise
            raise PluginError(impl.plugin_name, name, error) from error


def in_order(impls: Iterable[Any]) -> list[Any]:
    """Registration order, `tryfirst` ones first, `trylast` ones last. pluggy lists plain and `tryfirst`
    implementations in registration order but puts each new `trylast` one at the front."""
    impls = list(impls)
    first = [impl for impl in impls if impl.tryfirst]
    plain = [impl for impl in impls if not (impl.tryfirst or impl.trylast)]
    return first + plain + [impl for impl in reversed(impls) if impl.trylast]


def _version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "?"


def option_field(plugin: str) -> Callable[[tuple], str]:
    """How a job's option is named in an error: `plugins.<name>.<option>`."""
    return lambda location: ".".join(["plugins", plugin, *map(str, location)])
