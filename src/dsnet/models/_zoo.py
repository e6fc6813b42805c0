"""What the zoo holds: the timm model names that dsnet registers."""

from __future__ import annotations

import fnmatch

import timm


def list_zoo(pattern: str = "*") -> list[str]:
    """Names of the models dsnet registers into timm (sorted), optionally filtered by a shell ``pattern``.

    Example:
        >>> import dsnet
        >>> list_zoo("dsnet_tiny*")
        ['dsnet_tiny', 'dsnet_tiny_concat']
    """
    names = []
    for name in timm.list_models():
        module = timm.models.model_entrypoint(name).__module__
        if module.startswith("dsnet.") and fnmatch.fnmatch(name, pattern):
            names.append(name)
    return sorted(names)
