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


# ----------------------------------------------------------------------------------------------------------------
# --op block_sparse

BSA_CASE = ['--op', 'block_sparse', '--shape', '1x256x2x16', '--block-size', '32', '--device', 'cpu', '--iters', '2',
            '--warmup', '1']
BSA_OK = ('visionmix', 'visionmix-ref', 'sdpa-masked')


@pytest.fixture(scope='module')
def bsa(benchmark):
    return importlib.import_module('tools.bench.block_sparse')


def dense_pattern(bsa_module, case):
    """The case's dense ``[B, H, N, N]`` mask from the op's own expansion."""
    from visionmix.kernels.block_sparse import block_sparse_mask
    key_mask = None if case.key_mask is None else case.key_mask.expand(case.batch, -1)
    mask = block_sparse_mask(case.kv_indices, case.kv_num_blocks, case.offsets, case.offsets, key_mask,
                             case.is_causal)
    return mask.expand(case.batch, case.heads, -1, -1)


def test_block_sparse_tiny_case_writes_results(benchmark, tmp_path):
    result = benchmark.main(BSA_CASE + ['--topk', '3', '--mode', 'both', '--out-dir', str(tmp_path)])

    for ext in ('json', 'md', 'png'):
        path = Path(result['files'][ext])
        assert path.parent == tmp_path and path.stat().st_size > 0, path
    assert Path(result['files']['json']).name == 'block_sparse_both_fp32_random-256-b32-top3.json'
    saved = json.loads(Path(result['files']['json']).read_text())
    assert saved['op'] == 'block_sparse' and saved['device'] == 'cpu' and len(saved['rows']) == len(result['rows'])

    for mode in ('fwd', 'fwdbwd'):
        rows = rows_by(result, mode)
        for impl in BSA_OK:
            row = rows[impl]
            assert row['status'] == 'ok', (impl, mode, row['note'])
            assert row['latency_ms'] > 0 and row['throughput'] > 0 and row['ratio'] > 0
            assert row['tokens'] == 256 and row['pattern'] == 'random top-3' and row['blocks'] == '32'
            assert row['density'] == pytest.approx(3 / 8) and row['keys_per_query'] == pytest.approx(96)
        assert rows['visionmix']['ratio'] == pytest.approx(1.0)
        assert rows['visionmix-ref']['rel_err'] < 1e-5 and rows['sdpa-masked']['rel_err'] < 1e-4
        dense = rows['sdpa-dense']
        assert dense['status'] == 'ok' and (dense['rel_err'] < 1e-4 if mode == 'fwd' else dense['rel_err'] is None)
        assert rows['flex']['status'] == 'skipped' and '--with-flex' in rows['flex']['note']

    markdown = Path(result['files']['md']).read_text()
    assert '| density |' in markdown and '| 37.5% |' in markdown and '| sdpa-masked |' in markdown


def test_block_sparse_alias_causal_density_and_case_filter(benchmark, tmp_path):
    result = benchmark.main(BSA_CASE + ['--op', 'bsa', '--density', '0.5', '--causal', '--impls',
                                        'visionmix,sdpa-masked', '--out-dir', str(tmp_path)])
    rows = rows_by(result, 'fwd')
    assert rows['sdpa-masked']['status'] == 'ok' and rows['sdpa-masked']['rel_err'] < 1e-4
    assert rows['visionmix']['case'] == 'random-256-b32-top4-causal' and rows['visionmix']['is_causal']

    result = benchmark.main(['--op', 'bsa', '--cases', 'biformer-t-224-s3', '--device', 'cpu', '--iters', '1',
                             '--warmup', '1', '--impls', 'visionmix,sdpa-masked', '--out-dir', str(tmp_path)])
    assert {row['case'] for row in result['rows']} == {'biformer-t-224-s3'}
    assert all(row['status'] == 'ok' for row in result['rows'])
    assert Path(result['files']['json']).name == 'block_sparse_fwd_fp32_biformer-t-224-s3.json'
    assert any('small versions' in note for note in result['notes'])


def test_block_sparse_patterns_agree_with_dense_mask(bsa, common):
    """GRAT (2-D and 3-D, text after with padding keys, text first), BiFormer (index per image) and MoBA-like
    (per head, causal, a short last block): density and keys per query match the dense mask, and visionmix,
    the reference and SDPA with the dense mask agree on outputs and gradients."""
    cases = [
        bsa.grat_case('grat-x', (8, 8), 4, 'X', 2, 16, 2, text_tokens=16, attenable_text=10),
        bsa.grat_case('grat-b-3d', (4, 8, 8), (2, 4, 4), 'B', 2, 16, 1, text_tokens=32, text_first=True),
        bsa.biformer_case('biformer', 8, 2, 2, 2, batch=2, head_dim=16),
        bsa.moba_case('moba', 200, 32, 3, 2, 16, 1),
    ]
    args = types.SimpleNamespace(modes=('fwd', 'fwdbwd'), warmup=1, iters=1)
    for case in cases:
        mask = dense_pattern(bsa, case)
        assert case.keys_per_query() == pytest.approx(mask.float().sum(-1).mean().item()), case.name
        allowed = case.block_allowed()
        assert case.density() == pytest.approx(allowed.float().mean().item()), case.name
        impls = bsa.build_block_sparse_impls(case, torch.device('cpu'), ['visionmix', 'visionmix-ref', 'sdpa-dense',
                                                                       'sdpa-masked'], False)
        q, k, v = bsa.make_block_sparse_inputs(case, torch.device('cpu'), torch.float32)
        rows = common.benchmark_case(case, impls, q, k, v, args, torch.device('cpu'), torch.float32)
        for row in rows:
            assert row['status'] == 'ok', (case.name, row['impl'], row['mode'], row['note'])
            assert row['rel_err'] is None or row['rel_err'] < 1e-4, (case.name, row['impl'], row['mode'])
    assert cases[0].key_mask is not None and cases[2].kv_indices.shape[:2] == (2, 1)
    assert cases[3].kv_indices.shape[:2] == (1, 2) and cases[3].offsets[-2:] == (192, 200)


@pytest.mark.filterwarnings('ignore:flex_attention called without torch.compile')
def test_block_sparse_flex_block_masks(bsa, common, monkeypatch):
    """flex with its BlockMask, run eagerly (no compile on CPU): the block lists FlexAttention skips by match the
    index, full blocks are fully visible, and the output agrees with visionmix (from_kv_blocks and mask_mod)."""
    monkeypatch.setattr(torch, 'compile', lambda fn, **kwargs: fn)
    uniform = bsa.moba_case('moba', 200, 32, 3, 2, 16, 1)
    uniform.key_mask = torch.ones(1, 200, dtype=torch.bool)
    uniform.key_mask[0, 70:75] = False  # block 2 partly hidden: never a full block
    grat = bsa.grat_case('grat', (8, 8), 4, 'B', 2, 16, 1, text_tokens=16, attenable_text=10)
    for case, how in ((uniform, 'from_kv_blocks'), (grat, 'mask_mod')):
        [flex] = bsa.build_block_sparse_impls(case, torch.device('cpu'), ['flex'], with_flex=True)
        assert flex.skip is None and how in flex.note
        if how == 'from_kv_blocks':
            block_mask, _ = bsa.flex_block_mask(case, torch.device('cpu'))
            assert torch.equal(block_mask.to_dense().bool(), case.block_allowed())  # partial and full lists
            partial_num, _, full_num, full_idx = bsa.split_full_blocks(case, 32)
            assert partial_num.sum() > 0 and full_num.sum() > 0
            assert partial_num.sum() + full_num.sum() == case.kv_num_blocks.sum()
            dense = dense_pattern(bsa, case)[0]
            for h in range(case.heads):
                for i in range(case.num_blocks):
                    for j in full_idx[0, h, i, :full_num[0, h, i]].tolist():
                        assert j != 2 and dense[h, i * 32:(i + 1) * 32, j * 32:(j + 1) * 32].all(), (h, i, j)
        impls = bsa.build_block_sparse_impls(case, torch.device('cpu'), ['visionmix'], False) + [flex]
        q, k, v = bsa.make_block_sparse_inputs(case, torch.device('cpu'), torch.float32)
        errors = common.check_agreement(impls, q, k, v, case, torch.float32)
        assert errors['flex'] < 1e-4 and flex.skip is None


def test_block_sparse_disagreeing_impl_is_not_timed(bsa, common):
    case = bsa.grat_case('grat', (8, 8), 4, 'X', 2, 16, 1, text_tokens=16, attenable_text=10)
    impls = bsa.build_block_sparse_impls(case, torch.device('cpu'), ['visionmix', 'sdpa-masked'], False)
    masked = next(impl for impl in impls if impl.name == 'sdpa-masked')
    forward = masked.fn
    impls.append(common.OpImpl('wrong', fn=lambda q, k, v: v))
    impls.append(common.OpImpl('bad-grads', layout='heads_first',
                               fn=lambda q, k, v: forward(q, k, v) + (k - k.detach())))  # right output, wrong dk
    q, k, v = bsa.make_block_sparse_inputs(case, torch.device('cpu'), torch.float32)
    args = types.SimpleNamespace(modes=('fwd', 'fwdbwd'), warmup=1, iters=1)
    by = {(row['impl'], row['mode']): row for row in common.benchmark_case(case, impls, q, k, v, args,
                                                                           torch.device('cpu'), torch.float32)}
    assert by['sdpa-masked', 'fwdbwd']['status'] == 'ok' and by['sdpa-masked', 'fwdbwd']['latency_ms'] > 0
    for mode in ('fwd', 'fwdbwd'):
        wrong = by['wrong', mode]
        assert wrong['status'] == 'skipped' and wrong['latency_ms'] is None
        assert 'disagrees with visionmix' in wrong['note']
    assert by['bad-grads', 'fwd']['status'] == 'ok'
    bad = by['bad-grads', 'fwdbwd']
    assert bad['status'] == 'skipped' and bad['latency_ms'] is None and 'gradients disagree' in bad['note']


def test_block_sparse_memory_budgets(bsa, monkeypatch):
    monkeypatch.setitem(bsa.MASKED_MAX_ELEMENTS, 'cpu', 1000)
    monkeypatch.setitem(bsa.REFERENCE_MAX_ELEMENTS, 'cpu', 1000)
    case = bsa.biformer_case('tiny', 8, 2, 2, 2, batch=1, head_dim=16)
    impls = bsa.build_block_sparse_impls(case, torch.device('cpu'), ['visionmix-ref', 'sdpa-masked', 'sdpa-dense'],
                                         False)
    ref, masked, dense = impls
    assert ref.fn is None and 'budget' in ref.skip
    assert masked.fn is None and 'exceed' in masked.skip and 'budget' in masked.skip
    assert dense.skip is None


def test_block_sparse_default_cases(bsa):
    gpu = {case.name: case for case in bsa.default_block_sparse_cases(torch.device('cuda'), None)}
    tokens = {name: case.seq_len for name, case in gpu.items()}
    assert tokens['grat-b-flux-1024px'] == 64 * 64 + 512
    assert [tokens[f'grat-x-hyv-{t}x48x80'] for t in (8, 16, 32)] == [30720 + 256, 61440 + 256, 122880 + 256]
    assert gpu['grat-x-hyv-32x48x80'].heads == 24 and gpu['grat-x-hyv-32x48x80'].head_dim == 128
    assert gpu['grat-b-flux-1024px'].offsets[:3] == (0, 512, 768)  # text first, then 256-token groups
    assert gpu['grat-x-hyv-32x48x80'].key_mask[0, 122880:].sum() == bsa.HYV_VALID_TEXT
    # GRAT-X on the 8x6x10 group grid: 165 of 480 key groups plus the text block per image query block
    assert gpu['grat-x-hyv-32x48x80'].kv_num_blocks[0, 0, 0] == 166
    assert [gpu[f'biformer-t-224-s{s}'].keys_per_query() for s in (1, 2, 3)] == [64, 64, 64]
    assert gpu['biformer-t-224-s3'].block_size == 4 and bsa.flex_block_size(gpu['biformer-t-224-s3']) is None
    assert bsa.flex_block_size(gpu['moba-32k-b512-top3']) == 512
    cpu = bsa.default_block_sparse_cases(torch.device('cpu'), None)
    assert len(cpu) == len(gpu) - 4 and max(case.seq_len for case in cpu) <= 16384


@pytest.mark.parametrize('argv, message', [
    (['--op', 'bsa', '--shape', '1x256x2x16', '--block-size', '32', '--topk', '9'], '--topk must lie in [1, 8]'),
    (['--op', 'bsa', '--shape', '256', '--density', '1.5'], '--density is the fraction'),
    (['--op', 'bsa', '--shape', '256', '--density', '0.5', '--topk', '2'], 'give one'),
    (['--op', 'bsa', '--shape', '256', '--block-size', '512'], '--block-size must lie in [1, tokens = 256]'),
    (['--op', 'bsa', '--shape', '2x256x4'], '--shape for block_sparse takes'),
    (['--op', 'bsa', '--shape', '1x256x2x16', '--heads', '4'], 'already sets batch, heads and head_dim'),
    (['--op', 'bsa', '--topk', '2'], 'needs --shape'),
    (['--op', 'bsa', '--kernel-size', '7'], 'not for --op block_sparse'),
    (['--op', 'bsa', '--cases', 'nope'], 'matches no default case'),
    (['--op', 'bsa', '--cases', 'grat-*', '--shape', '256'], 'does not go with --shape'),
    (['--op', 'bsa', '--impls', 'natten'], '--impls takes a subset of'),
    (['--op', 'na2d', '--block-size', '64'], 'only for --op block_sparse'),
    (['--op', 'linear', '--density', '0.5'], 'only for --op block_sparse'),
    (['--model', 'nat_mini', '--topk', '2'], 'not with --model'),
])
def test_block_sparse_argument_errors(benchmark, capsys, tmp_path, argv, message):
    with pytest.raises(SystemExit) as exc:
        benchmark.main(argv + ['--device', 'cpu', '--out-dir', str(tmp_path)])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------------------------
# --op selective_scan

SS_FAST = ['--op', 'selective_scan', '--device', 'cpu', '--iters', '1', '--warmup', '1']


@pytest.fixture(scope='module')
def ss(benchmark):
    return importlib.import_module('tools.bench.selective_scan')


def triton_runs_on_cpu():
    from visionmix.kernels._backend import interpreter_mode
    return interpreter_mode()


def scan_rows(ss, common, case, impls, modes=('fwd', 'fwdbwd')):
    args = types.SimpleNamespace(modes=modes, warmup=1, iters=1)
    rows = ss.benchmark_scan_case(case, args, torch.device('cpu'), torch.float32, impls=impls)
    return {(row['impl'], row['mode']): row for row in rows}


def reference_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False):
    """A stand-in for mamba-ssm's ``selective_scan_fn`` (same signature) computed by the PyTorch reference."""
    from visionmix.kernels.selective_scan import selective_scan_reference
    return selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def test_selective_scan_cpu_cases_run_end_to_end(benchmark, tmp_path):
    """The CPU default cases, forward and backward: the Triton kernel (interpreter) against the reference, one
    launch against one call per direction; mamba-ssm's rows say why it is missing, or run."""
    result = benchmark.main(SS_FAST + ['--mode', 'both', '--out-dir', str(tmp_path)])

    for ext in ('json', 'md', 'png'):
        path = Path(result['files'][ext])
        assert path.parent == tmp_path and path.stat().st_size > 0, path
    assert Path(result['files']['json']).name == 'selective_scan_both_fp32.json'
    saved = json.loads(Path(result['files']['json']).read_text())
    assert saved['op'] == 'selective_scan' and saved['device'] == 'cpu' and saved['device_name']
    assert len(saved['rows']) == len(result['rows']) == 2 * 2 * 4  # cases x modes x impls
    interpreted = triton_runs_on_cpu()
    for case, dirs in (('vcmamba-tiny-4x4', 4), ('mamba-tiny-l32', 1)):
        for mode in ('fwd', 'fwdbwd'):
            rows = {row['impl']: row for row in result['rows'] if row['case'] == case and row['mode'] == mode}
            ref = rows['visionmix-ref']
            assert ref['status'] == 'ok' and ref['latency_ms'] > 0 and ref['directions'] == dirs, ref['note']
            assert ref['tokens'] == 16 if dirs == 4 else 32
            if interpreted:
                assert rows['visionmix']['status'] == 'ok' and rows['visionmix']['ratio'] == pytest.approx(1.0)
                assert ref['rel_err'] < 1e-4 and ref['ratio'] > 0
            else:
                assert rows['visionmix']['status'] == 'skipped' and 'TRITON_INTERPRET' in rows['visionmix']['note']
            loop = rows['visionmix-loop']
            if dirs == 1:
                assert loop['status'] == 'skipped' and 'one direction' in loop['note']
            elif interpreted:
                assert loop['status'] == 'ok' and loop['rel_err'] < 1e-4 and loop['ratio'] > 0, loop['note']
            if mode == 'fwdbwd' and interpreted:
                grads = ref['grad_rel_err']
                assert {'du', 'ddelta', 'dA', 'dB', 'dC', 'dD', 'ddelta_bias'} <= set(grads)
                assert ('dz' in grads) == (dirs == 1) and ('dB_bias' in grads) == (dirs == 4)
            mamba = rows['mamba-ssm']
            assert mamba['status'] == 'skipped' and mamba['latency_ms'] is None and mamba['note']
            if importlib.util.find_spec('mamba_ssm') is None:
                assert 'not installed' in mamba['note']

    markdown = Path(result['files']['md']).read_text()
    assert '| dirs |' in markdown and '| mamba-ssm |' in markdown and '| ratio |' in markdown
    assert 'relative RMS error' in markdown and 'tiny versions' in markdown
    assert 'absolute numbers are not meaningful' in markdown


def test_selective_scan_disagreeing_impl_is_not_timed(ss, common):
    case = ss.ScanCase('tiny', 1, 8, 4, grid=(3, 4))
    impls = ss.build_scan_impls(case, torch.device('cpu'), ['visionmix-ref'])
    reference = impls[0].fn
    impls.append(common.OpImpl('wrong', fn=lambda t: t['u']))
    impls.append(common.OpImpl('bad-grads', fn=lambda t: reference(t) + (t['D'] - t['D'].detach())[:, None]))
    by = scan_rows(ss, common, case, impls)

    assert by['visionmix-ref', 'fwdbwd']['status'] == 'ok' and by['visionmix-ref', 'fwdbwd']['latency_ms'] > 0
    for mode in ('fwd', 'fwdbwd'):
        wrong = by['wrong', mode]
        assert wrong['status'] == 'skipped' and wrong['latency_ms'] is None
        assert 'disagrees with visionmix-ref' in wrong['note']
    assert by['wrong', 'fwd']['rel_err'] > 0.5 and by['wrong', 'fwdbwd']['rel_err'] is None  # never got to backward
    assert by['bad-grads', 'fwd']['status'] == 'ok' and by['bad-grads', 'fwd']['rel_err'] == 0
    bad = by['bad-grads', 'fwdbwd']
    assert bad['status'] == 'skipped' and bad['latency_ms'] is None and 'gradient dD disagrees' in bad['note']
    assert bad['rel_err'] > 1e-2 and bad['grad_rel_err']['du'] == 0


def test_selective_scan_mamba_ssm_stand_in(ss, common, monkeypatch):
    """mamba-ssm's rows wired to a stand-in with selective_scan_fn's signature: one call per direction over
    permuted u (VCMamba) and one gated call (language model) agree with the op, outputs and every gradient; a
    stand-in that gets the op wrong is not timed, and one that raises on its first call is reported."""
    module = types.ModuleType('mamba_ssm.ops.selective_scan_interface')
    module.selective_scan_fn = reference_scan_fn
    for name in ('mamba_ssm', 'mamba_ssm.ops'):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, 'mamba_ssm.ops.selective_scan_interface', module)
    monkeypatch.setattr(ss, 'mamba_skip', lambda device: None)

    for case in (ss.ScanCase('snake', 2, 8, 4, grid=(3, 4)), ss.ScanCase('lm', 1, 8, 4, 20, gate=True)):
        by = scan_rows(ss, common, case, ss.build_scan_impls(case, torch.device('cpu'), ['visionmix-ref',
                                                                                        'mamba-ssm']))
        for mode in ('fwd', 'fwdbwd'):
            row = by['mamba-ssm', mode]
            assert row['status'] == 'ok' and row['latency_ms'] > 0 and row['rel_err'] < 1e-5, (case.name, row)
        assert ('calls over permuted u' in by['mamba-ssm', 'fwd']['note']) == (case.grid is not None)

    case = ss.ScanCase('snake', 1, 8, 4, grid=(3, 4))
    module.selective_scan_fn = lambda u, delta, A, B, C, D, *rest: reference_scan_fn(u, delta, A, B, C, None, *rest)
    [impl] = ss.build_scan_impls(case, torch.device('cpu'), ['mamba-ssm'])
    errors = ss.check_scan_agreement(ss.build_scan_impls(case, torch.device('cpu'), ['visionmix-ref']) + [impl],
                                     ss.make_scan_inputs(case, torch.device('cpu'), torch.float32), torch.float32)
    assert errors['mamba-ssm'] > 1e-2 and 'disagrees' in impl.skip

    def broken(*args):
        raise RuntimeError('CUDA error: no kernel image is available for execution on the device')
    module.selective_scan_fn = broken
    by = scan_rows(ss, common, case, ss.build_scan_impls(case, torch.device('cpu'), ['visionmix-ref', 'mamba-ssm']))
    for mode in ('fwd', 'fwdbwd'):
        row = by['mamba-ssm', mode]
        assert row['status'] == 'skipped' and 'failed on its first call: RuntimeError' in row['note']
    assert by['visionmix-ref', 'fwd']['status'] == 'ok'


def test_selective_scan_without_mamba_ssm(benchmark, ss, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, 'mamba_ssm', None)  # import fails as if not installed
    result = benchmark.main(SS_FAST + ['--cases', 'mamba-*', '--impls', 'visionmix-ref,mamba-ssm',
                                       '--out-dir', str(tmp_path)])
    rows = rows_by(result, 'fwd')
    assert rows['visionmix-ref']['status'] == 'ok' and {row['case'] for row in result['rows']} == {'mamba-tiny-l32'}
    assert rows['mamba-ssm']['status'] == 'skipped' and 'not installed' in rows['mamba-ssm']['note']
    assert Path(result['files']['json']).name == 'selective_scan_fwd_fp32_mamba-_.json'
    assert 'not installed' in Path(result['files']['md']).read_text()

    def broken_import():
        raise RuntimeError('selective_scan_cuda was built for another torch')
    monkeypatch.setattr(ss, 'import_mamba_scan', broken_import)
    [impl] = ss.build_scan_impls(ss.ScanCase('lm', 1, 8, 4, 20, gate=True), torch.device('cpu'), ['mamba-ssm'])
    assert impl.fn is None and 'unavailable: RuntimeError: selective_scan_cuda' in impl.skip


def test_selective_scan_custom_case_and_budget(benchmark, ss, monkeypatch, tmp_path):
    result = benchmark.main(SS_FAST + ['--shape', '2x8x3x5', '--d-state', '4', '--impls', 'visionmix-ref',
                                       '--out-dir', str(tmp_path)])
    [row] = result['rows']
    assert row['status'] == 'ok' and row['case'] == 'snake4-d8-n4-3x5' and row['grid'] == [3, 5]
    assert row['shape'] == '2x8x15' and row['directions'] == 4 and row['tokens'] == 30
    case = ss.ScanCase('lm', 1, 8, 4, 64, gate=True)
    monkeypatch.setitem(ss.REFERENCE_MAX_ELEMENTS, 'cpu', 1000)
    [impl] = ss.build_scan_impls(case, torch.device('cpu'), ['visionmix-ref'])
    assert impl.fn is None and 'budget' in impl.skip


def test_selective_scan_default_cases(ss):
    gpu = {case.name: case for case in ss.default_scan_cases(torch.device('cuda'), 8)}
    assert [gpu[f'vcmamba-{v}-224'].dim for v in 'smb'] == [576, 896, 1024]
    assert [gpu[f'vcmamba-s-{px}'].seq_len for px in (224, 512)] == [49, 256]
    assert all(case.d_state == 16 and case.batch == 8 for case in gpu.values())
    lm = [case for case in gpu.values() if case.grid is None]
    assert [case.dim for case in lm] == [1536, 2048] and all(c.seq_len == 2048 and c.gate for c in lm)
    orders, _ = gpu['vcmamba-b-512'].scan_orders('cpu')
    assert orders.shape == (4, 256) and torch.equal(orders.sort(dim=1).values, torch.arange(256).expand(4, -1))
    inputs = ss.make_scan_inputs(ss.ScanCase('t', 2, 8, 4, grid=(3, 4)), torch.device('cpu'), torch.bfloat16)
    assert inputs['u'].dtype == inputs['B'].dtype == torch.bfloat16 and inputs['A'].dtype == torch.float32
    assert inputs['B_bias'].shape == (4, 4, 12) and 'z' not in inputs
    cpu = ss.default_scan_cases(torch.device('cpu'), 1)
    assert len(cpu) == 2 and max(case.dim * case.seq_len for case in cpu) <= 256


@pytest.mark.parametrize('argv, message', [
    (['--shape', '2x8x3x5x1'], '--shape for selective_scan takes'),
    (['--shape', '8x32', '--d-state', '300'], 'dstate'),
    (['--shape', '2x8x32', '--batch', '4'], 'already sets the batch'),
    (['--d-state', '4'], 'needs --shape'),
    (['--kernel-size', '7'], 'not for --op selective_scan'),
    (['--cases', 'nope'], 'matches no default case'),
    (['--cases', 'mamba-*', '--shape', '8x32'], 'does not go with --shape'),
    (['--density', '0.5'], 'only for --op block_sparse'),
    (['--impls', 'natten'], '--impls takes a subset of'),
    (['--op', 'na2d', '--d-state', '4'], 'only for --op selective_scan'),
    (['--op', 'linear', '--cases', 'x'], '--cases: only for --op block_sparse or selective_scan'),
])
def test_selective_scan_argument_errors(benchmark, capsys, tmp_path, argv, message):
    with pytest.raises(SystemExit) as exc:
        benchmark.main(['--op', 'selective_scan'] + argv + ['--device', 'cpu', '--out-dir', str(tmp_path)])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
