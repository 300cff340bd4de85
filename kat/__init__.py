"""kat: Kolmogorov-Arnold Transformers (KAT) for timm.

`import kat` registers kat_tiny/small/base (and the published `*_patch16_224` names) with timm, so
`timm.create_model('kat_small')` works. The GR-KAN operator lives in `kat.rational`.
"""

from kat import models  # noqa: F401  (registers the models with timm)
from kat.rational import GroupRational, group_rational

__version__ = "0.1.0"
__all__ = ["GroupRational", "group_rational", "models", "__version__"]
