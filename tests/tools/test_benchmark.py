"""CPU tests of tools/benchmark.py: files written, baselines checked against visionmix, argument errors."""
import importlib.util
import json
from pathlib import Path

import pytest
import timm
import torch

BENCHMARK_PATH = Path(__file__).resolve().parents[2] / 'tools' / 'benchmark.py'
TINY_CASE = ['--op', 'na2d', '--shape', '1x12x12x2x16', '--kernel-size', '3', '--device', 'cpu',
             '--iters', '3', '--warmup', '1']


@pytest.fixture(scope='module')
def benchmark():
    spec = importlib.util.spec_from_file_location('visionmix_benchmark_tool', BENCHMARK_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rows_by(result, mode):
    return {row['impl']: row for row in result['rows'] if row['mode'] == mode}


def test_op_tiny_case_writes_results(benchmark, tmp_path):
    result = benchmark.main(TINY_CASE + ['--mode', 'both', '--out-dir', str(tmp_path)])

    for ext in ('json', 'md', 'png'):
        path = Path(result['files'][ext])
        assert path.parent == tmp_path and path.stat().st_size > 0, path
    saved = json.loads(Path(result['files']['json']).read_text())
    assert saved['device'] == 'cpu' and saved['dtype'] == 'fp32' and saved['device_name']
    assert len(saved['rows']) == len(result['rows'])

    for mode in ('fwd', 'fwdbwd'):
        rows = rows_by(result, mode)
        for impl in ('visionmix', 'visionmix-ref', 'sdpa-dense', 'sdpa-masked'):
            row = rows[impl]
            assert row['status'] == 'ok', (impl, mode, row['note'])
            assert row['latency_ms'] > 0 and row['throughput'] > 0
            assert row['ratio'] is not None and row['ratio'] > 0
            assert row['tokens'] == 144 and row['peak_mib'] is None  # no peak memory off CUDA
        assert rows['visionmix']['ratio'] == pytest.approx(1.0)
        assert rows['visionmix-ref']['rel_err'] < 1e-4  # outputs (fwd) or dq/dk/dv (fwdbwd)
        assert rows['sdpa-masked']['rel_err'] < 1e-4
        if mode == 'fwd':
            assert rows['sdpa-dense']['rel_err'] < 1e-4  # checked against plain dense attention
        else:
            assert rows['sdpa-dense']['rel_err'] is None  # a different operation: its gradients are not compared
        assert rows['flex']['status'] == 'skipped' and '--with-flex' in rows['flex']['note']
        natten = rows['natten']
        assert natten['note'] if natten['status'] == 'skipped' else natten['rel_err'] < 1e-4

    markdown = Path(result['files']['md']).read_text()
    assert '| ratio |' in markdown and '| sdpa-masked |' in markdown
    assert 'absolute numbers are not meaningful' in markdown


def test_disagreeing_gradients_are_not_timed(benchmark):
    case = benchmark.OpCase('tiny', (12, 12), (3, 3), (1, 1), 2, 16, 1)
    impls = benchmark.build_op_impls(case, 'na2d', torch.device('cpu'), ['visionmix', 'sdpa-masked'], False)
    masked = next(impl for impl in impls if impl.name == 'sdpa-masked')
    forward = masked.fn
    masked.fn = lambda q, k, v: forward(q, k * 1.5, v)  # same forward graph, wrong dk
    q, k, v = benchmark.make_op_inputs(case, torch.device('cpu'), torch.float32)
    errors = benchmark.check_gradient_agreement(impls, q, k, v, case, torch.float32)
    assert errors['sdpa-masked'] > 1e-2 and 'gradients disagree with visionmix' in masked.no_backward


def test_disagreeing_baseline_is_not_timed(benchmark):
    case = benchmark.OpCase('tiny', (12, 12), (3, 3), (1, 1), 2, 16, 1)
    impls = benchmark.build_op_impls(case, 'na2d', torch.device('cpu'), ['visionmix', 'sdpa-masked'], False)
    impls.append(benchmark.OpImpl('wrong', fn=lambda q, k, v: v))
    q, k, v = benchmark.make_op_inputs(case, torch.device('cpu'), torch.float32)
    errors = benchmark.check_agreement(impls, q, k, v, case, torch.float32)
    status = {impl.name: impl.skip for impl in impls}
    assert status['visionmix'] is None and status['sdpa-masked'] is None
    assert errors['sdpa-masked'] < 1e-4
    assert errors['wrong'] > 1e-2 and 'disagrees' in status['wrong']


def test_unknown_op_exits_with_clear_error(benchmark, capsys):
    with pytest.raises(SystemExit) as exc:
        benchmark.main(['--op', 'nope'])
    assert exc.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_impossible_case_exits_before_timing(benchmark, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        benchmark.main(['--op', 'na2d', '--shape', '12x12', '--kernel-size', '7', '--dilation', '2',
                        '--device', 'cpu', '--out-dir', str(tmp_path)])
    assert exc.value.code == 2
    assert 'kernel_size * dilation' in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_model_mode_test_nat(benchmark, tmp_path):
    if 'test_nat' not in timm.list_models('test_nat'):
        pytest.skip('test_nat is not registered with timm yet')
    result = benchmark.main(['--model', 'test_nat', '--device', 'cpu', '--batch', '1', '--iters', '2',
                             '--warmup', '1', '--out-dir', str(tmp_path)])
    row = rows_by(result, 'fwd')['visionmix']
    assert row['status'] == 'ok', row['note']
    assert row['params_m'] > 0 and row['latency_ms'] > 0 and row['throughput'] > 0
    assert row['input_size'][0] == 3
    assert Path(result['files']['json']).exists() and Path(result['files']['png']).exists()


def test_list_models_shows_visionmix_models_only(benchmark, capsys):
    result = benchmark.main(['--list-models'])
    assert 'test_convnext' not in result['models']
    if 'test_nat' in timm.list_models('test_nat'):
        assert 'test_nat' in result['models'] and 'test_nat' in capsys.readouterr().out
