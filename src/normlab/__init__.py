"""normlab: training deep networks with less, different or no normalization.

The library half (no experiment machinery is imported here):

* :func:`normlab.functional.standardization_kl` and :class:`StandardizationLoss`
  (Collins et al. 2019, arXiv 1903.00925);
* :func:`list_methods`, :func:`apply` and :func:`norm_layer`: one registry of methods and one way to
  apply them to any model;
* :func:`fold`: an inference model with every batch-statistics layer folded into its conv/linear.
"""

from . import functional
from .methods.fold import FoldReport, fold, fold_report
from .methods.registry import Handle, apply, list_methods, norm_layer
from .methods.std_loss import StandardizationLoss

__version__ = "0.1.0"
__all__ = ["functional", "StandardizationLoss", "Handle", "apply", "list_methods", "norm_layer", "fold", "fold_report",
           "FoldReport", "__version__"]
