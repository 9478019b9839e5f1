"""The namespace cluster (scaletrain.launch.netns) with the test harness's worker environment."""

from __future__ import annotations

from contextlib import contextmanager

from harness import cli_env

from scaletrain.launch.netns import finish, tail  # noqa: F401  (the tests' names)
from scaletrain.launch.netns import make_cluster as _make_cluster


@contextmanager
def make_cluster(n: int, rate: str | None = None):
    with _make_cluster(n, rate, env=cli_env()) as cluster:
        yield cluster
