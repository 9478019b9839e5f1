from scaletrain.model.counts import matmul_param_count, param_count, train_flops_per_token
from scaletrain.model.llama import Llama, cross_entropy_loss, generate

__all__ = ["Llama", "cross_entropy_loss", "generate", "param_count", "matmul_param_count",
           "train_flops_per_token"]
