"""`evaluate` metric modules shipped with the harness, loaded by path (no Hub needed)."""

from __future__ import annotations

from pathlib import Path

from harness.errors import ConfigError

METRICS_DIR = Path(__file__).parent


def available() -> list[str]:
    return sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())


def load_metric(name: str | None):
    """The metric module `name`; None for a task that scores nothing (metric: null)."""
    import evaluate

    if name is None:
        return None
    if name not in available():
        raise ConfigError(f"task.metric={name!r} is unknown (allowed: {', '.join(available())})")
    return evaluate.load(str(METRICS_DIR / name / f"{name}.py"))
