from src.engine.base import Chain, Engine, Link
from src.engine.sequential import SequentialEngine

__all__ = ["Chain", "Engine", "Link", "SequentialEngine"]
