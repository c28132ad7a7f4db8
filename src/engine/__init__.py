from src.engine.base import Chain, Engine, Link
from src.engine.sequential import SequentialEngine
from src.engine.distributed import DistributedEngine
from src.engine.vmap import AutoEngine, VmapEngine

__all__ = ["Chain", "DistributedEngine", "Engine", "Link", "SequentialEngine", "AutoEngine", "VmapEngine"]
