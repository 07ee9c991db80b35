"""CPU tests of tools/benchmark.py and tools/bench/: files written, baselines checked against visionmix, argument
errors."""
import importlib
import importlib.util
import json
import sys
import types
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
    spec.loader.exec_module(module)  # also puts the repository root on sys.path for tools.bench
    return module


@pytest.fixture(scope='module')
def na(benchmark):
    return importlib.import_module('tools.bench.neighborhood')


@pytest.fixture(scope='module')
def la(benchmark):
    return importlib.import_module('tools.bench.linear_attention')


@pytest.fixture(scope='module')
def common(benchmark):
    return importlib.import_module('tools.bench.common')


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


def test_disagreeing_gradients_are_not_timed(na, common):
    case = na.OpCase('tiny', (12, 12), (3, 3), (1, 1), 2, 16, 1)
    impls = na.build_op_impls(case, 'na2d', torch.device('cpu'), ['visionmix', 'sdpa-masked'], False)
    masked = next(impl for impl in impls if impl.name == 'sdpa-masked')
    forward = masked.fn
    masked.fn = lambda q, k, v: forward(q, k * 1.5, v)  # same forward graph, wrong dk
    q, k, v = na.make_op_inputs(case, torch.device('cpu'), torch.float32)
    errors = common.check_gradient_agreement(impls, q, k, v, case, torch.float32)
    assert errors['sdpa-masked'] > 1e-2 and 'gradients disagree with visionmix' in masked.no_backward


def test_disagreeing_baseline_is_not_timed(na, common):
    case = na.OpCase('tiny', (12, 12), (3, 3), (1, 1), 2, 16, 1)
    impls = na.build_op_impls(case, 'na2d', torch.device('cpu'), ['visionmix', 'sdpa-masked'], False)
    impls.append(common.OpImpl('wrong', fn=lambda q, k, v: v))
    q, k, v = na.make_op_inputs(case, torch.device('cpu'), torch.float32)
    errors = common.check_agreement(impls, q, k, v, case, torch.float32)
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


# ----------------------------------------------------------------------------------------------------------------
# --op linear

LINEAR_CASE = ['--op', 'linear', '--shape', '2x6x6x2x16', '--device', 'cpu', '--iters', '2', '--warmup', '1']
LIBRARIES = {'fla': 'fla', 'fbi-la': 'flash_bla'}


def test_linear_tiny_case_writes_results(benchmark, tmp_path):
    result = benchmark.main(LINEAR_CASE + ['--feature-map', 'relu', '--mode', 'both', '--out-dir', str(tmp_path)])

    for ext in ('json', 'md', 'png'):
        path = Path(result['files'][ext])
        assert path.parent == tmp_path and path.stat().st_size > 0, path
    assert Path(result['files']['json']).name == 'linear_both_fp32_normalized-relu-6x6.json'
    saved = json.loads(Path(result['files']['json']).read_text())
    assert saved['op'] == 'linear' and saved['device'] == 'cpu' and len(saved['rows']) == len(result['rows'])

    for mode in ('fwd', 'fwdbwd'):
        rows = rows_by(result, mode)
        for impl in ('visionmix', 'visionmix-ref', 'torch-quadratic'):
            row = rows[impl]
            assert row['status'] == 'ok', (impl, mode, row['note'])
            assert row['latency_ms'] > 0 and row['throughput'] > 0 and row['ratio'] > 0
            assert row['tokens'] == 72 and row['form'] == 'normalized' and row['feature_map'] == 'relu'
        assert rows['visionmix']['ratio'] == pytest.approx(1.0)
        assert rows['visionmix-ref']['rel_err'] < 1e-5 and rows['torch-quadratic']['rel_err'] < 1e-4
        for impl, module in LIBRARIES.items():
            row = rows[impl]
            assert row['status'] == 'skipped' and row['latency_ms'] is None and row['note']
            if importlib.util.find_spec(module) is None:
                assert 'not installed' in row['note']

    markdown = Path(result['files']['md']).read_text()
    assert '| form |' in markdown and '| torch-quadratic |' in markdown and '| ratio |' in markdown


@pytest.mark.parametrize('form', ['rala', 'mala', 'inline', 'l2vit'])
def test_linear_forms_agree_with_quadratic(benchmark, tmp_path, form):
    result = benchmark.main(LINEAR_CASE + ['--op', 'la', '--form', form, '--mode', 'both',
                                           '--impls', 'visionmix,torch-quadratic', '--out-dir', str(tmp_path)])
    for mode in ('fwd', 'fwdbwd'):
        rows = rows_by(result, mode)
        assert set(rows) == {'visionmix', 'torch-quadratic'}
        quadratic = rows['torch-quadratic']
        assert quadratic['status'] == 'ok' and quadratic['rel_err'] < 1e-4, quadratic['note']
        assert quadratic['rope'] == (form in ('mala', 'rala'))


def test_linear_disagreeing_impl_is_not_timed(la, common):
    case = la.LinearCase('tiny', (6, 6), 2, 16, 1, 'mala', rope=True)
    impls = la.build_linear_impls(case, torch.device('cpu'), ['visionmix', 'torch-quadratic'])
    impls.append(common.OpImpl('wrong', fn=lambda q, k, v: v))
    quadratic = next(impl for impl in impls if impl.name == 'torch-quadratic')
    forward = quadratic.fn
    bad_grads = common.OpImpl('bad-grads', layout='heads_first',
                              fn=lambda q, k, v: forward(q, k, v) + (k - k.detach()))  # right output, wrong dk
    impls.append(bad_grads)
    q, k, v = la.make_linear_inputs(case, torch.device('cpu'), torch.float32)
    args = types.SimpleNamespace(modes=('fwd', 'fwdbwd'), warmup=1, iters=1)
    rows = common.benchmark_case(case, impls, q, k, v, args, torch.device('cpu'), torch.float32)

    by = {(row['impl'], row['mode']): row for row in rows}
    assert by['torch-quadratic', 'fwd']['rel_err'] < 1e-4 and by['torch-quadratic', 'fwdbwd']['latency_ms'] > 0
    for mode in ('fwd', 'fwdbwd'):
        wrong = by['wrong', mode]
        assert wrong['status'] == 'skipped' and wrong['latency_ms'] is None
        assert 'disagrees with visionmix' in wrong['note']
    assert by['bad-grads', 'fwd']['status'] == 'ok' and by['bad-grads', 'fwd']['rel_err'] < 1e-4
    bad = by['bad-grads', 'fwdbwd']
    assert bad['status'] == 'skipped' and bad['latency_ms'] is None and 'gradients disagree' in bad['note']
    assert bad['rel_err'] > 1e-2


def test_quadratic_skipped_over_memory_budget(la, monkeypatch):
    monkeypatch.setitem(la.QUADRATIC_MAX_WEIGHTS, 'cpu', 1000)
    case = la.LinearCase('tiny', (6, 6), 2, 16, 1)
    [impl] = la.build_linear_impls(case, torch.device('cpu'), ['torch-quadratic'])
    assert impl.fn is None and 'exceed' in impl.skip and 'budget' in impl.skip


def test_library_rows_with_stand_in_modules(la, common, monkeypatch):
    """The fla and fbi-la rows wired to PyTorch stand-ins with the libraries' signatures: fla (causal) is checked
    against causal linear attention, fbi-la against visionmix, outputs and gradients."""
    def chunk_linear_attn(q, k, v, scale=None, normalize=True):  # [B, N, H, D], causal
        num = torch.einsum('bnhd,bnhde->bnhe', q, torch.einsum('bnhd,bnhe->bnhde', k, v).cumsum(1))
        return num / (q * k.cumsum(1)).sum(-1, keepdim=True), None

    def fused_linear_attention(q, k, v, scale=None, eps=1e-6):  # [B, H, N, D], bidirectional
        summary = k.transpose(-1, -2) @ v / k.shape[-2]
        return q @ summary / (q @ k.mean(-2, keepdim=True).transpose(-1, -2) + eps)

    for name in ('fla', 'fla.ops', 'fla.ops.linear_attn', 'flash_bla', 'flash_bla.ops', 'flash_bla.ops.linear_attn',
                 'flash_bla.ops.linear_attn.fused'):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules['fla.ops.linear_attn'].chunk_linear_attn = chunk_linear_attn
    sys.modules['flash_bla.ops.linear_attn.fused'].linear_attention = fused_linear_attention
    monkeypatch.setattr(la, 'library_skip', lambda case, device, name: None)

    case = la.LinearCase('tiny', (6, 6), 2, 16, 1)
    impls = la.build_linear_impls(case, torch.device('cpu'), ['visionmix', 'fla', 'fbi-la'])
    q, k, v = la.make_linear_inputs(case, torch.device('cpu'), torch.float32)
    args = types.SimpleNamespace(modes=('fwd', 'fwdbwd'), warmup=1, iters=1)
    by = {(row['impl'], row['mode']): row for row in common.benchmark_case(case, impls, q, k, v, args,
                                                                           torch.device('cpu'), torch.float32)}
    for impl in ('fla', 'fbi-la'):
        for mode in ('fwd', 'fwdbwd'):
            assert by[impl, mode]['status'] == 'ok' and by[impl, mode]['latency_ms'] > 0, by[impl, mode]['note']
    assert by['fla', 'fwd']['rel_err'] < 1e-4 and 'causal' in by['fla', 'fwd']['note']
    assert by['fla', 'fwdbwd']['rel_err'] is None  # a different operation: gradients not compared
    assert by['fbi-la', 'fwd']['rel_err'] < 1e-4 and by['fbi-la', 'fwdbwd']['rel_err'] < 1e-4


@pytest.mark.parametrize('argv, message', [
    (['--op', 'linear', '--form', 'nope'], "invalid choice: 'nope'"),
    (['--op', 'linear', '--shape', '2x6x6'], '--shape for linear takes'),
    (['--op', 'linear', '--shape', '1x6x6x2xk'], 'integers joined by "x"'),
    (['--op', 'linear', '--shape', '1x6x6x2x15', '--form', 'mala'], 'head_dim must be even'),
    (['--op', 'linear', '--kernel-size', '7'], 'only for neighborhood ops'),
    (['--op', 'na2d', '--form', 'mala'], 'only for --op linear'),
    (['--op', 'linear', '--feature-map', 'relu'], 'needs --shape'),
])
def test_linear_argument_errors(benchmark, capsys, tmp_path, argv, message):
    with pytest.raises(SystemExit) as exc:
        benchmark.main(argv + ['--device', 'cpu', '--out-dir', str(tmp_path)])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
