"""The model registry: immutable model versions on any fsspec URL and one ``champion`` pointer.

What batch generation, sweeps and evaluation load by default, and what the retraining flow
promotes into. No server: the layout on storage is the registry (see ``store.py``).
"""

from tasks.registry.decision import Decision, decide_promotion
from tasks.registry.store import ModelVersion, Registry, RegistryError

__all__ = ["Decision", "ModelVersion", "Registry", "RegistryError", "decide_promotion"]
