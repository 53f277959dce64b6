"""esgd_cuda: ESGD-M (equilibrated SGD with quasi-hyperbolic momentum) for PyTorch, with fused kernels.

`ESGD` is the optimizer; `extension_info()` reports which native kernels were built and which run;
`functional.esgd_update` is the multi-tensor update the optimizer applies.
"""

from . import functional
from ._extension import extension_info
from .optimizer import ESGD

__all__ = ["ESGD", "extension_info", "functional"]
__version__ = "0.1.0"
