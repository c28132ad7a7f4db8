from src.models.nets import MLP, LeNet, ResNet20

__all__ = ["MLP", "LeNet", "ResNet20"]
