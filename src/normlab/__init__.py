"""normlab: training deep networks with less, different or no normalization.

The library half (no experiment machinery is imported here):

* :func:`normlab.functional.standardization_kl` and :class:`StandardizationLoss`
  (Collins et al. 2019, arXiv 1903.00925);
* :func:`methods`, :func:`apply` and :func:`norm_layer`: one registry of methods and one way to
  apply them to any model.
"""

from . import functional
from .methods.registry import Handle, apply, methods, norm_layer
from .methods.std_loss import StandardizationLoss

__version__ = "0.1.0"
__all__ = ["functional", "StandardizationLoss", "Handle", "apply", "methods", "norm_layer", "__version__"]
