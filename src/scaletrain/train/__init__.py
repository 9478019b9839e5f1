from scaletrain.train.launch import train
from scaletrain.train.trainer import Trainer

__all__ = ["Trainer", "train"]
