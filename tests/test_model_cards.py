"""Model cards (``model_cards/*.md``): every visionmix family has one, and its variants table names every
registered model of the family with its parameter count.

Parameter counts are taken from models built on the ``meta`` device, so nothing is allocated.
"""
import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, Iterable, List

import pytest
import timm
import torch
from timm.models import model_entrypoint

import visionmix  # noqa: F401  (registers the models)

REPO = Path(__file__).resolve().parents[1]
CARDS_DIR = REPO / 'model_cards'
STATS_TOOL = REPO / 'tools' / 'model_card_stats.py'

# card file -> the visionmix.models modules whose registered models it documents
CARD_MODULES = {
    'mala.md': ('mala',),
    'inline.md': ('inline_deit', 'inline_pvt', 'inline_swin', 'inline_cswin'),
    'l2vit.md': ('l2vit',),
    'nat.md': ('nat',),
    'biformer.md': ('biformer',),
    'grat_vit.md': ('grat_vit',),
    'vcmamba.md': ('vcmamba',),
}
MODEL_COLUMN = 'model'
PARAMS_COLUMN = 'params (M)'


def registered_by_module() -> Dict[str, List[str]]:
    """``{module: [model, ...]}`` for every model registered by a ``visionmix.models.*`` module (no ``test_*``)."""
    found: Dict[str, List[str]] = {}
    for name in timm.list_models():
        module = model_entrypoint(name).__module__
        if module.startswith('visionmix.models.') and not name.startswith('test_'):
            found.setdefault(module.rsplit('.', 1)[1], []).append(name)
    return found


@lru_cache(maxsize=None)
def param_count(name: str) -> int:
    """Parameters of ``timm.create_model(name)`` (a pretrained tag selects that tag's cfg, e.g. its head)."""
    with torch.device('meta'):
        model = timm.create_model(name)
    return sum(p.numel() for p in model.parameters())


def _cells(line: str) -> List[str]:
    return [c.strip() for c in line.strip().strip('|').split('|')]


def variant_rows(text: str) -> List[Dict[str, str]]:
    """Rows (header -> cell) of every markdown table whose header has a ``model`` and a ``params (M)`` column."""
    rows, block = [], []
    for line in text.splitlines() + ['']:
        if line.lstrip().startswith('|'):
            block.append(line)
            continue
        if len(block) >= 2:
            header = _cells(block[0])
            if MODEL_COLUMN in header and PARAMS_COLUMN in header:
                rows += [dict(zip(header, _cells(b))) for b in block[2:]]
        block = []
    return rows


def card_problems(path: Path, expected: Iterable[str], count: Callable[[str], int]) -> List[str]:
    """What is wrong with a card: missing file, missing variants table, missing rows, wrong parameter counts."""
    if not path.is_file():
        return [f'{path.name}: the card does not exist']
    rows = variant_rows(path.read_text(encoding='utf-8'))
    if not rows:
        return [f"{path.name}: no variants table with '{MODEL_COLUMN}' and '{PARAMS_COLUMN}' columns"]
    expected = set(expected)
    problems, named = [], set()
    for row in rows:
        name = row.get(MODEL_COLUMN, '').strip('`* ')
        base = name.split('.', 1)[0]
        if base not in expected:
            problems.append(f'{path.name}: row {name!r} is not a registered model of this card')
            continue
        named.add(base)
        cell = row.get(PARAMS_COLUMN, '')
        try:
            float(cell)
        except ValueError:
            problems.append(f'{path.name}: {name}: params cell {cell!r} is not a number')
            continue
        decimals = len(cell.split('.', 1)[1]) if '.' in cell else 0
        actual = f'{count(name) / 1e6:.{decimals}f}'
        if actual != cell:
            problems.append(f'{path.name}: {name}: the card says {cell}M parameters, the model has {actual}M')
    problems += [f'{path.name}: no row for {name}' for name in sorted(expected - named)]
    return problems


def test_every_family_module_has_a_card():
    documented = {m for modules in CARD_MODULES.values() for m in modules}
    undocumented = sorted(set(registered_by_module()) - documented)
    assert not undocumented, f'visionmix.models modules registering models without a model card: {undocumented}'


@pytest.mark.parametrize('card', sorted(CARD_MODULES))
def test_card_names_every_variant_with_its_params(card):
    registered = registered_by_module()
    expected = [name for module in CARD_MODULES[card] for name in registered.get(module, [])]
    assert expected, f'{card}: no registered models in {CARD_MODULES[card]}'
    problems = card_problems(CARDS_DIR / card, expected, param_count)
    assert not problems, '\n'.join(problems)


_CARD = """# Card

| model | input | params (M) | GMACs |
|:--|:-:|--:|--:|
| `net_a` | 224 | 1.50 | 0.10 |
| `net_a.in22k` | 224 | 2.00 | 0.10 |
"""
_COUNTS = {'net_a': 1_500_000, 'net_a.in22k': 2_000_000, 'net_b': 3_000_000}


def test_card_check_can_fail(tmp_path):
    card = tmp_path / 'card.md'
    assert card_problems(card, ['net_a'], _COUNTS.__getitem__) == ['card.md: the card does not exist']
    card.write_text('# Card\n\nno table\n')
    assert card_problems(card, ['net_a'], _COUNTS.__getitem__) == [
        "card.md: no variants table with 'model' and 'params (M)' columns"]
    card.write_text(_CARD)
    assert card_problems(card, ['net_a'], _COUNTS.__getitem__) == []
    assert card_problems(card, ['net_a', 'net_b'], _COUNTS.__getitem__) == ['card.md: no row for net_b']
    card.write_text(_CARD.replace('1.50', '1.49'))
    assert card_problems(card, ['net_a'], _COUNTS.__getitem__) == [
        'card.md: net_a: the card says 1.49M parameters, the model has 1.50M']
    assert card_problems(card, [], _COUNTS.__getitem__)[0] == (
        "card.md: row 'net_a' is not a registered model of this card")


def test_stats_tool_rows_parse_and_agree():
    spec = importlib.util.spec_from_file_location('visionmix_model_card_stats', STATS_TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    stats = tool.count('test_nat')
    assert stats['params'] == param_count('test_nat') and stats['macs'] > 0
    text = tool.HEADER + '\n' + tool.format_row(dict(name='test_nat', tags=[]), stats)
    (row,) = variant_rows(text)
    assert row[MODEL_COLUMN] == '`test_nat`' and float(row[PARAMS_COLUMN]) == round(stats['params'] / 1e6, 2)


def test_cards_list_every_segmentation_config():
    """Each ADE20K config is listed by a model card, and every config a card names exists."""
    import re
    configs = {p.name for p in (REPO / 'configs' / 'ade20k').glob('*.py')}
    named = set()
    for card in CARDS_DIR.glob('*.md'):
        named |= set(re.findall(r'configs/ade20k/([\w.-]+\.py)', card.read_text()))
    assert configs, 'no ADE20K configs found'
    assert named - configs == set(), f'cards name configs that do not exist: {sorted(named - configs)}'
    assert configs - named == set(), f'configs no card lists: {sorted(configs - named)}'
