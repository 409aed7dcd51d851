"""The small pass framework: a transform is a class with a name, a typed config and ``apply``.

``Transform.__call__`` is the one place that times a transform, cleans the graph up after it
(dead-code elimination, lint, recompile), logs one line with its match count and optionally dumps
the graph; subclasses only implement :meth:`Transform.apply`. ``run_pipeline`` runs an explicit,
ordered list of transform names from the plain-dict registry in ``autodeploy.transforms``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from torch.fx import GraphModule

logger = logging.getLogger("autodeploy.transforms")


@dataclass
class TransformConfig:
    """Options shared by every transform; subclasses add their own fields."""

    enabled: bool = True


@dataclass
class TransformInfo:
    """What one transform did to the graph."""

    name: str
    num_matches: int = 0
    changed: bool = False
    seconds: float = 0.0
    skipped: bool = False
    details: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        if self.skipped:
            return f"[{self.name}] skipped (disabled)"
        extra = "".join(f", {k}={v}" for k, v in self.details.items() if not isinstance(v, (list, dict)))
        return f"[{self.name}] {self.num_matches} matches, changed={self.changed}, {self.seconds * 1e3:.1f} ms{extra}"


def make_config(config_cls: type[TransformConfig], options: Mapping[str, Any] | TransformConfig | None,
                owner: str) -> TransformConfig:
    """Build ``config_cls`` from a mapping; an unknown option is an error listing the known ones."""
    if options is None:
        return config_cls()
    if isinstance(options, config_cls):
        return options
    if not isinstance(options, Mapping):
        raise TypeError(f"{owner}: config must be a mapping or {config_cls.__name__}, got {type(options).__name__}")
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"{owner}: unknown option(s) {unknown}; known options: {sorted(known)}")
    return config_cls(**options)


class Transform:
    """Base class. Subclasses set ``name`` (and ``Config``) and implement ``apply``."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[TransformConfig]] = TransformConfig
    requires: ClassVar[tuple[str, ...]] = ()  # transforms that must run earlier in a pipeline

    def __init__(self, config: Mapping[str, Any] | TransformConfig | None = None):
        self.config = make_config(self.Config, config, self.name)

    def apply(self, gm: GraphModule, info: TransformInfo) -> None:
        """Rewrite ``gm`` in place; record matches, ``changed`` and details on ``info``."""
        raise NotImplementedError

    def __call__(self, gm: GraphModule, dump_dir: str | Path | None = None, index: int = 0) -> TransformInfo:
        info = TransformInfo(self.name)
        if not self.config.enabled:
            info.skipped = True
            logger.info(info.summary())
            return info
        start = time.perf_counter()
        self.apply(gm, info)
        if info.changed:
            gm.graph.eliminate_dead_code()
            gm.graph.lint()
            gm.recompile()
        info.seconds = time.perf_counter() - start
        logger.info(info.summary())
        if dump_dir is not None:
            path = Path(dump_dir)
            path.mkdir(parents=True, exist_ok=True)
            (path / f"{index:02d}_{self.name}.txt").write_text(str(gm.graph))
        return info
