"""The float64 oracle of the gradient-based mixers' tests: one GPT in float64 on one process.

A distributed run hands over its parameters gathered into full tensors (``gathered``) and its
probe batches; ``Float64GPT`` rebuilds the model from them and takes exact float64 gradients
of the mean token loss, against which the runs' fp32 dot products (DGA's alignments, PiKE's
gradient statistics) are compared.
"""

from __future__ import annotations

import dataclasses
from typing import Dict

import numpy as np
import torch
import torch.nn.functional as F


def gathered(param, tensor, tp_size: int) -> np.ndarray:
    """A TP-split tensor gathered along its partition dim (float64 numpy); replicated tensors as they are.
    Collective: every tensor-parallel rank calls it for the same parameters."""
    from megatron.core import parallel_state

    if tp_size == 1 or not getattr(param, "tensor_model_parallel", False):
        return tensor.detach().double().numpy().copy()
    parts = [torch.empty_like(tensor) for _ in range(tp_size)]
    torch.distributed.all_gather(parts, tensor.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=param.partition_dim).double().numpy()


class Float64GPT:
    """The run's GPT (same config, fp32 config fields) with the given full parameters, in float64.
    Needs an initialised single-rank layout (``platform.initialize`` with TP=PP=1)."""

    def __init__(self, model_cfg, params: Dict[str, np.ndarray]):
        from megatron_dga.model import build_gpt_model

        model = build_gpt_model(dataclasses.replace(model_cfg, fp16=False, bf16=False), 1, 1)
        self.params = dict(model.named_parameters())
        assert sorted(self.params) == sorted(params)
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(torch.from_numpy(params[name]))
        self.model = model.double()
        self.names = sorted(self.params)

    def grad(self, batch: Dict[str, np.ndarray]) -> Dict[str, torch.Tensor]:
        """Gradient of the mean token loss of ``batch`` (numpy arrays as the dataset collates them)."""
        from megatron_dga.model import causal_attention_mask

        batch = {key: torch.from_numpy(value) for key, value in batch.items()}
        assert bool((batch["loss_mask"] == 1).all())  # so every rank/micro-batch split averages alike
        mask = causal_attention_mask(batch["tokens"].shape[1], "cpu")
        logits = self.model(batch["tokens"], batch["position_ids"], mask)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1))
        return dict(zip(self.names, torch.autograd.grad(loss, [self.params[n] for n in self.names])))

    def dot(self, a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor], weight=None) -> float:
        """sum over parameters of <a, weight * b> in float64 (weight: per-parameter tensors, or None)."""
        return sum(float((a[n] * b[n] * (1.0 if weight is None else weight[n])).sum()) for n in self.names)
