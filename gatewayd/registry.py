"""Find plugin classes: entry points in group ``gatewayd.plugins``, or a ``module:Class`` string."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points

from gatewayd.plugin_api import ENTRY_POINT_GROUP, Plugin


class PluginNotFound(LookupError):
    """No entry point has that name and it is not a ``module:Class`` string."""


@dataclass(frozen=True, slots=True)
class Discovered:
    name: str
    target: str
    distribution: str
    version: str


def discovered() -> list[Discovered]:
    """Installed plugins, without importing them."""
    out = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist
        out.append(Discovered(ep.name, ep.value, dist.name if dist else "?", dist.version if dist else "?"))
    return sorted(out, key=lambda d: d.name)


def resolve(ref: str) -> str:
    """Turn a config ``plugin`` value into ``module:Class`` without importing anything."""
    for d in discovered():
        if d.name == ref:
            return d.target
    if ":" in ref:
        return ref
    names = ", ".join(d.name for d in discovered()) or "none installed"
    raise PluginNotFound(f"no plugin named {ref!r} in entry points ({names}) and not a module:Class")


def load_class(target: str) -> type[Plugin]:
    """Import ``module:Class`` and check it is a Plugin (runs in the worker process)."""
    module_name, _, attr = target.partition(":")
    obj: object = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, Plugin)):
        raise TypeError(f"{target} is not a subclass of gatewayd.plugin_api.Plugin")
    return obj
