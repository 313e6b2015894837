"""Fixtures shared by the test modules (pytest provides them by name; nothing to import).

A module that needs other data defines its own fixture of the same name, which takes precedence
there (test_dga.py, test_domains.py, test_domain_map.py, test_gpu_training.py).
"""

import pytest

from tests.helpers.synthetic import three_domain_shards


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """Three domains and a specific set mixing the first two (``synthetic.three_domain_shards``), written
    once per session: the trainer-level tests only read them."""
    return three_domain_shards(str(tmp_path_factory.mktemp("shards")))
