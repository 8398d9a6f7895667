"""Which plugins a reading goes to, whether they have room, and handing it over."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from gatewayd.batching import PluginQueue
from gatewayd.config import MatchRule
from gatewayd.errors import Unavailable
from gatewayd.plugin_api import Reading


@dataclass(slots=True)
class Route:
    name: str
    rule: MatchRule
    queue: PluginQueue
    retry_after_s: int

    def matches(self, node: str, fields: Iterable[str]) -> bool:
        if self.rule.nodes and not any(fnmatchcase(node, pat) for pat in self.rule.nodes):
            return False
        return not self.rule.fields or any(f in self.rule.fields for f in fields)


class Router:
    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = list(routes)

    def targets(self, node: str, fields: Mapping[str, object]) -> list[Route]:
        return [r for r in self.routes if r.matches(node, fields)]

    def admit(self, per_reading: Sequence[Sequence[Route]]) -> None:
        """Raise Unavailable (5.03 + Max-Age) if any target queue lacks room for its share."""
        need: dict[str, int] = {}
        by_name: dict[str, Route] = {}
        for targets in per_reading:
            for r in targets:
                need[r.name] = need.get(r.name, 0) + 1
                by_name[r.name] = r
        for name, n in need.items():
            route = by_name[name]
            if not route.queue.has_room(n):
                raise Unavailable(f"plugin {name} queue full", route.retry_after_s, "queue_full")

    @staticmethod
    def dispatch(readings: Sequence[Reading], per_reading: Sequence[Sequence[Route]]) -> None:
        for reading, targets in zip(readings, per_reading, strict=True):
            for r in targets:
                r.queue.put((reading,))
