"""Loading original training checkpoints that pickle their configuration, without running pickled code."""
import argparse
import io
import os
import sys

import pytest
import torch

from visionmix.checkpoint import UnsafeCheckpointError, load_checkpoint


def _saved(obj) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def test_training_dict_with_yacs_and_argparse_configs(fake_yacs, monkeypatch):
    weights = {'head.weight': torch.randn(3, 4), 'pos_embed': torch.randn(1, 5, 4).half()}
    config = fake_yacs({'MODEL': fake_yacs({'TYPE': 'inline_swin', 'DROP_PATH_RATE': 0.2}), 'SEED': 0})
    buffer = _saved({'model': weights, 'config': config, 'args': argparse.Namespace(lr=1e-3), 'epoch': 299})
    monkeypatch.delitem(sys.modules, 'yacs')
    monkeypatch.delitem(sys.modules, 'yacs.config')
    with pytest.raises(Exception):
        torch.load(buffer, weights_only=True)  # what the stock safe loader does with such files
    buffer.seek(0)
    checkpoint = load_checkpoint(buffer)
    assert checkpoint['epoch'] == 299 and checkpoint['args'].lr == 1e-3
    assert checkpoint['config']['MODEL']['TYPE'] == 'inline_swin' and checkpoint['config']['SEED'] == 0
    for name, tensor in weights.items():
        assert torch.equal(checkpoint['model'][name], tensor) and checkpoint['model'][name].dtype == tensor.dtype


class _Exploit:
    def __reduce__(self):
        return os.system, ('echo pwned',)


def test_refuses_code_outside_the_allowlist():
    buffer = _saved({'model': {'w': torch.ones(1)}, 'payload': _Exploit()})
    with pytest.raises(UnsafeCheckpointError, match='posix.system|os.system|nt.system'):
        load_checkpoint(buffer)


def test_plain_state_dict_loads_with_weights_only(tmp_path):
    path = tmp_path / 'w.pth'
    torch.save({'w': torch.arange(3.0)}, path)
    assert torch.equal(load_checkpoint(path)['w'], torch.arange(3.0))
