"""pytest setup: make `disco` (python/) and the numpy reference importable.

CTest runs these with DISCO_LIBRARY=$<TARGET_FILE:disco> and
PYTHONPATH=python; run by hand, the package finds the newest build*/ library.
"""

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
if os.path.join(REPO, "python") not in sys.path:
    sys.path.insert(1, os.path.join(REPO, "python"))


@pytest.fixture
def make_group():
    """disco.local_group that closes every comm at the end of the test."""
    import disco

    made = []

    def make(world_size, **kw):
        kw.setdefault("timeout_ms", 5000)
        comms = disco.local_group(world_size, **kw)
        made.extend(comms)
        return comms

    yield make
    for c in made:
        c.close()
