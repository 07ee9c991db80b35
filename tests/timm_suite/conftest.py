"""Run timm's own model test suite (``test_models.py`` from timm's sdist) on every visionmix model."""
import os
import re

import pytest
import timm
import timm.models._registry as registry

import visionmix  # noqa: F401  (registers the models before timm's tests are collected)

VISIONMIX_MODELS = sorted(
    name for name in timm.list_models() if registry.model_entrypoint(name).__module__.startswith('visionmix.'))

# timm routes its cls-token families (vit_*, deit*, ...) to the *_non_std tests through test_models.NON_STD_FILTERS,
# a list given to timm.list_models when the parametrizations are built; visionmix's cls-token families join it there.
VISIONMIX_NON_STD_FILTERS = ['inline_deit_*', 'test_inline_deit', 'vit_*_grat', 'deit_*_grat', 'test_vit_grat']
_timm_list_models = timm.list_models


def _list_models_with_visionmix_non_std(*args, **kwargs):
    for key in ('filter', 'exclude_filters'):
        value = kwargs.get(key)
        if isinstance(value, (list, tuple)) and 'deit*' in value:  # NON_STD_FILTERS, or a list built from it
            kwargs[key] = list(value) + VISIONMIX_NON_STD_FILTERS
    return _timm_list_models(*args, **kwargs)


timm.list_models = _list_models_with_visionmix_non_std  # before test_models.py does `from timm import list_models`

# timm runs its forward_intermediates tests only for model modules named in FEAT_INTER_FILTERS;
# list visionmix models under one of those modules so they get those tests too.
registry._module_to_models['swin_transformer'].update(VISIONMIX_MODELS)


# these download the released weights; run them with VISIONMIX_ONLINE=1 on a machine with network access
DOWNLOAD_TESTS = ('test_model_load_pretrained', 'test_model_features_pretrained')
# timm marks this one "slow, excluded from CI": it prunes at every stage and checks the same code paths for any
# size, so it runs on the tiny variants (VISIONMIX_SLOW=1 runs it on every model)
TINY_ONLY_TESTS = ('test_prune_intermediate_layers_contract',)
# tracing and scripting follow the same code at every width and depth: the larger sizes (base, medium, large) of
# a family run them with VISIONMIX_SLOW=1; the tiny, mini, small and special variants always do
TRACE_TESTS = ('test_model_forward_fx', 'test_model_backward_fx', 'test_model_forward_torchscript',
               'test_pruned_features_torchscript', 'test_feature_getter_stage_ends_torchscript')
LARGE_SIZES = re.compile(r'_(base|medium|large)(_|$)')


def pytest_collection_modifyitems(config, items):
    # the suite covers every timm model: keep only the tests parametrized with a visionmix model
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, 'callspec', None)
        name = callspec.params.get('model_name') if callspec else None
        if name is not None and name.split('.')[0] in VISIONMIX_MODELS:
            if item.originalname in DOWNLOAD_TESTS and not os.environ.get('VISIONMIX_ONLINE'):
                item.add_marker(pytest.mark.skip(reason='downloads released weights (set VISIONMIX_ONLINE=1)'))
            slow = os.environ.get('VISIONMIX_SLOW')
            if item.originalname in TINY_ONLY_TESTS and not name.startswith('test_') and not slow:
                drop.append(item)
                continue
            if item.originalname in TRACE_TESTS and LARGE_SIZES.search(name) and not slow:
                drop.append(item)
                continue
            keep.append(item)
        elif item.path.name == 'test_models.py':
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
