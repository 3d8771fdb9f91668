"""The plugin manager: built-in plugins and installed ones (entry-point group `inpaint_worker`), alike."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from . import hooks
from .errors import InvalidRequest, JobError, PluginError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "inpaint_worker"
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
# built-ins a request cannot turn off: a job stops when cancelled and by its deadline (the deadline is what keeps
# Redis from handing a running job to a second worker); an operator can still block them
ALWAYS_ON = ("cancel", "deadline")


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
            self.pm.register(importlib.import_module(module), name=name)
        except Exception as error:  # a broken plugin never stops the worker
            self._skip(name, error)

    def _load_entry_points(self) -> None:
        from importlib.metadata import entry_points

        for entry in entry_points(group=ENTRY_POINT_GROUP):
            dist = getattr(entry, "dist", None)
            self.report.origin[entry.name] = {"kind": "installed", "distribution": dist.name if dist else "?",
                                              "version": dist.version if dist else "?"}
            if entry.name in self.blocked:
                self.report.blocked.append(entry.name)
                continue
            if self.pm.has_plugin(entry.name):
                self._skip(entry.name, RuntimeError("a plugin of that name is already registered"))
                continue
            try:
                self.pm.register(entry.load(), name=entry.name)
            except Exception as error:
                self._skip(entry.name, error)

    def _skip(self, name: str, error: BaseException) -> None:
        self.report.failed[name] = f"{type(error).__name__}: {error}"
        log.error("plugin %r failed to load and is skipped: %s", name, self.report.failed[name])

    def register(self, plugin: Any, name: str) -> None:
        """Register a plugin object directly (tests, embedding applications)."""
        if name in self.blocked:
            self.report.blocked.append(name)
            return
        self.pm.register(plugin, name=name)
        self.report.origin.setdefault(name, {"kind": "registered", "distribution": "-", "version": "-"})

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
                raise InvalidRequest(f"plugins.{name}", f"cannot be turned off by a request ({', '.join(ALWAYS_ON)} "
                                     "keep every job stoppable); give options instead, or none")
            model = getattr(plugin, "Options", None)
            if value is False or model is None:
                validated[name] = value
                continue
            try:
                validated[name] = model.model_validate(value if isinstance(value, dict) else {})
            except Exception as error:  # pydantic's ValidationError
                raise InvalidRequest(f"plugins.{name}", _first_line(error)) from None
        for name in self.names:
            model = getattr(self.pm.get_plugin(name), "Options", None)
            if name not in validated and model is not None:
                try:
                    validated[name] = model()
                except Exception as error:  # the operator's configuration, not the request, is wrong
                    raise PluginError(name, "Options", error) from None
        return validated

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
        impls = getattr(self.plugins.pm.hook, name).get_hookimpls()
        impls = [i for i in impls if i.plugin not in self.removed]
        return sorted(impls, key=lambda i: 0 if i.tryfirst else 2 if i.trylast else 1)

    def call(self, name: str, **kwargs: Any) -> list:
        """Call every implementation; return what they returned, Nones left out."""
        results = []
        for impl in self._impls(name):
            returned = self._call_one(impl, name, kwargs)
            if returned is not None:
                results.append(returned)
        return results

    def chain(self, name: str, key: str, value: Any, **kwargs: Any) -> Any:
        """Call each implementation with `key=value`; a non-None return replaces the value for the next."""
        for impl in self._impls(name):
            returned = self._call_one(impl, name, {**kwargs, key: value})
            if returned is not None:
                value = returned
        return value

    @staticmethod
    def _call_one(impl: Any, name: str, kwargs: dict[str, Any]) -> Any:
        try:
            return impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
        except JobError:
            raise
        except Exception as error:
            if type(error).__name__ == "OutOfMemoryError":  # torch's: the job's memory, not the plugin's fault
                raise
            raise PluginError(impl.plugin_name, name, error) from error


def _version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "?"


def _first_line(error: Exception) -> str:
    errors = getattr(error, "errors", None)
    if callable(errors):
        return "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg'].removeprefix('Value error, ')}" for e in errors()
        )
    return str(error)
