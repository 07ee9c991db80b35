import pathlib

import pytest

from .fetch import REASON, TARGET


def test_timm_suite_available():
    if not TARGET.exists():
        reason = REASON.read_text() if REASON.exists() else 'timm tests/test_models.py was not fetched'
        pytest.skip(f'timm model suite not run: {reason}')
    assert 'def test_model_forward' in pathlib.Path(TARGET).read_text()
