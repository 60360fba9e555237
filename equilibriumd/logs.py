"""structlog, configured once: JSON lines when stdout is not a TTY (a
DaemonSet's log collector), a readable console when it is."""

from __future__ import annotations

import importlib
import logging
import sys
import types
from typing import Any

# structlog loads rich (and with it pygments) for pretty tracebacks whenever it
# is installed, as in a dev venv where a tool pulls it in: ~5 MB of the agent's
# 50 MB budget for output nobody reads (the agent logs JSON lines with plain
# tracebacks). Unless something already imported rich, structlog sees none.
if "rich" not in sys.modules:
    sys.modules["rich"] = None  # type: ignore[assignment]


def _defer(name: str) -> None:
    """Import module `name` when something first uses it, not when it is imported.

    structlog imports asyncio for its async logging methods, which the agent never
    calls; asyncio imports ssl, and ssl OpenSSL: ~6 MB of the agent's RSS. The
    stand-in loads the real module at its first attribute (a submodule import
    asks for `__path__`), then takes on its contents, so holders of either see
    the same names."""
    if name in sys.modules:
        return
    stub = types.ModuleType(name, "stand-in until first use (equilibriumd.logs._defer)")

    def load(attr: str) -> Any:
        if sys.modules.get(name) is stub:
            del sys.modules[name]
        real = importlib.import_module(name)
        stub.__dict__.pop("__getattr__", None)
        stub.__dict__.update(real.__dict__)
        return getattr(real, attr)

    stub.__getattr__ = load  # type: ignore[method-assign]  # PEP 562: called for missing attributes
    sys.modules[name] = stub


_defer("asyncio")
import structlog  # noqa: E402

_configured = False


def setup(level: str = "info", json: bool | None = None) -> None:
    global _configured
    if _configured:
        return
    if json is None:
        json = not sys.stdout.isatty()
    lvl = getattr(logging, level.upper(), logging.INFO)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=True,
    )
    # Standard-library loggers (libraries) go through the same renderer.
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(processors=[
        structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer], foreign_pre_chain=shared))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(lvl)
    _configured = True


def get(name: str = "equilibriumd") -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name)
