"""The mixing tests' shared data."""

import pytest

from tests.helpers.synthetic import write_domains


@pytest.fixture(scope="session")
def four_domains(tmp_path_factory):
    """Four domains and a specific set mixing the first three (0.5, 0.3, 0.2): the alignment tests' data."""
    return write_domains(
        str(tmp_path_factory.mktemp("four_domains")),
        k=4,
        docs_per_domain=48,
        doc_len=64,
        specific_mixture=[0.5, 0.3, 0.2, 0.0],
    )
