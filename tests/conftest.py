"""Fixtures of the tests; the helpers they share are in ``helpers.py``."""

from __future__ import annotations

import pytest
from helpers import PROFILES, make_handshake

import monte_trio
from monte_trio import Handshake


@pytest.fixture(params=PROFILES)
def profile(request: pytest.FixtureRequest) -> Handshake:
    """A handshake of each wire profile (``"monte-v1"``, ``"native"``): the one meaning
    of ``profile`` in these tests (its name is ``profile.profile``)."""
    name: str = request.param
    return make_handshake(name)


@pytest.fixture
def monte_v1() -> Handshake:
    """The monte-v1 handshake, for behaviour specific to that profile."""
    return monte_trio.MonteV1Handshake()


@pytest.fixture
def native() -> Handshake:
    """The native handshake, for behaviour specific to that profile."""
    return make_handshake("native")
