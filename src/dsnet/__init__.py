"""dsnet: dual-stream vision backbones (DS-Net, TransXNet, MixFormer) for PyTorch.

Importing the package registers every model of the zoo into timm's registry, so that
``timm.create_model("dsnet_tiny")`` works after ``import dsnet``.
"""

from dsnet import models

__version__ = "0.1.0"
__all__ = ["__version__", "models"]
