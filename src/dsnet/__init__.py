"""dsnet: dual-stream vision backbones (DS-Net, TransXNet, MixFormer) for PyTorch.

Importing the package registers every model of the zoo into timm's registry, so that
``timm.create_model("dsnet_tiny")`` works after ``import dsnet``.
"""

from dsnet import models
from dsnet.convert.zoo import convert_checkpoint
from dsnet.models._pretrained import set_release_converter

# The layers: layers <- models <- convert <- engine/detection <- cli. Models download their releases but leave the
# conversion to dsnet.convert, which sits above them; the package root wires the two together.
set_release_converter(convert_checkpoint)

__version__ = "0.1.0"
__all__ = ["__version__", "models"]
