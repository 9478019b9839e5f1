import shutil
import sysconfig
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """A small real corpus: 40 standard-library modules, copied so the test
    owns them (and their mtimes) for the session."""
    out = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in sorted(p.name for p in stdlib.glob("*.py"))[:40]:
        shutil.copy(stdlib / name, out / name)
    return out


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def debug_config(tmp_path_factory, corpus_dir, cache_dir) -> Path:
    """configs/debug.toml pointed at the test corpus and a session cache."""
    text = (Path(__file__).resolve().parents[1] / "configs" / "debug.toml").read_text()
    text = text.replace('source = "stdlib"', f'source = "{corpus_dir}"\ncache_dir = "{cache_dir}"')
    path = tmp_path_factory.mktemp("config") / "debug.toml"
    path.write_text(text)
    return path
