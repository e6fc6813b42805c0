"""Inference on CPU: the fused model form (:func:`fuse`), exported-artefact runtimes and the model server."""

from dsnet.deploy.fuse import fuse

__all__ = ["fuse"]
