"""tools/peak_memory.py: the live-tensor tracker counts what an op sequence holds at its peak."""
import json

import torch

from tools.peak_memory import LiveTensorBytes, main


def test_tracker_counts_live_storages_at_the_peak():
    x = torch.randn(256, 256, requires_grad=True)
    tracker = LiveTensorBytes()
    with tracker:
        y = (x @ x).relu()  # x@x, then relu: two live 256x256 results
        del y
        z = (x * 2).sum()   # after y is freed only a fresh 256x256 and a scalar are live
        del z
    assert tracker.peak == 2 * 256 * 256 * 4


def test_views_share_their_storage():
    x = torch.randn(128, 128)
    tracker = LiveTensorBytes()
    with tracker:
        y = x.exp()
        views = [y[i] for i in range(4)] + [y.t(), y.view(-1)]
        del views
    assert tracker.peak == 128 * 128 * 4


def test_command_line_compares_backends(tmp_path, capsys):
    out = tmp_path / 'mem.json'
    rows = main(['test_biformer', '--img-size', '64', '--backends', 'torch', 'triton', '--out', str(out)])
    assert [r['backend'] for r in rows] == ['torch', 'triton'] and all(r['peak_mib'] > 0 for r in rows)
    assert json.loads(out.read_text())['rows'] == rows
    assert '| `test_biformer` | 64 | torch |' in capsys.readouterr().out
