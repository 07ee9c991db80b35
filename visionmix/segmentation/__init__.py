"""ADE20K-style semantic segmentation with mmsegmentation.

Importing this package registers every family's backbone in mmseg's ``MODELS`` registry (see ``backbones``); the
configs under ``configs/ade20k`` import it through ``custom_imports``. It needs the ``seg`` extra
(``pip install "visionmix[seg]"``: mmsegmentation 1.2.2, mmengine 0.10.7, mmcv-lite 2.1.0, ftfy, regex). mmcv-lite
has no compiled ops; a stand-in ``mmcv._ext`` that raises on use is installed first (``mmcv_ext``), which is all
UperNet and Semantic FPN need.
"""
try:
    import mmengine  # noqa: F401
    import mmseg  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError('visionmix.segmentation needs mmsegmentation: pip install "visionmix[seg]" '
                      '(mmsegmentation==1.2.2 mmengine==0.10.7 mmcv-lite==2.1.0 ftfy regex)') from err

from .mmcv_ext import install_mmcv_ext_stub

install_mmcv_ext_stub()

import mmseg.models  # noqa: E402,F401  (registers mmseg's heads and losses before ours)

from .backbones import FAMILY_BACKBONES, TimmFeatureBackbone  # noqa: E402

__all__ = ['FAMILY_BACKBONES', 'TimmFeatureBackbone', 'install_mmcv_ext_stub']
