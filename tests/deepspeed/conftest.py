import pytest
from ds_testing import save_teacher

from megadistill.testing import run_distributed


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory):
    """A random online teacher's distributed checkpoint (``ds_testing.run_config``'s architecture)."""
    path = str(tmp_path_factory.mktemp("teacher") / "teacher")
    run_distributed(save_teacher, 1, path)
    return path
