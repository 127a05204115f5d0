"""The registry of recipe stages (:class:`~diffquant.registry.Registry`), filled by
``@STAGES.register`` where the stages are defined (``diffquant.methods``)."""
from __future__ import annotations

from ..registry import Registry

#: every recipe stage (filled by ``diffquant.methods``)
STAGES: Registry = Registry("stage")

__all__ = ["STAGES", "Registry"]
