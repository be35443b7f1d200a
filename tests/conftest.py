"""Shared fixtures."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest
from support.harness import Etcd, Lab


@pytest.fixture
def etcd() -> Iterator[Etcd]:
    """A fresh single-member etcd on 127.0.0.1 (root namespace), free ports, temp data dir."""
    server = Etcd().start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    """Underlay namespace + bridge + etcd on it; add hosts with lab.add_host()."""
    world = Lab(tmp_path)
    try:
        world.start_etcd()
        yield world
    finally:
        world.close()
