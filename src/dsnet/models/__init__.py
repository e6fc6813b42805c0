"""The model zoo. Importing this package registers every model into timm's registry."""

from dsnet.models._paper import PAPER_FIGURES, PaperFigures
from dsnet.models._zoo import list_zoo
from dsnet.models.dsnet import DSNet
from dsnet.models.mixformer import MixFormer
from dsnet.models.mobile_former import MobileFormer
from dsnet.models.transxnet import TransXNet

__all__ = ["PAPER_FIGURES", "DSNet", "MixFormer", "MobileFormer", "PaperFigures", "TransXNet", "list_zoo"]
