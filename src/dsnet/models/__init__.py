"""The model zoo. Importing this package registers every model into timm's registry."""

from dsnet.models._paper import PAPER_FIGURES, PaperFigures
from dsnet.models._zoo import list_zoo

__all__ = ["PAPER_FIGURES", "PaperFigures", "list_zoo"]
