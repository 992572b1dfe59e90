"""kdkernels: fused knowledge-distillation losses for PyTorch (torch, Triton and CUDA C++ backends)."""
from . import distributed, reference
from .api import KDLoss, kd_loss, tempered_log_softmax, tempered_softmax
from .fused_linear import fused_linear_kd_loss
from .teachers import topk_teacher

__version__ = "0.1.0"
__all__ = ["kd_loss", "KDLoss", "tempered_softmax", "tempered_log_softmax", "reference", "__version__",
           "fused_linear_kd_loss", "topk_teacher", "distributed"]
