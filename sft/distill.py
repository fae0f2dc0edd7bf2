"""Knowledge distillation: the task (train/task.py) whose loss per target token is
    (1 - alpha) * CE(student, labels) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
from both models' hidden states (kernels/fused_linear_distill.py: chunked, neither model's logits held whole).
The teacher runs under inference mode in its own dtype and is never trained or saved. Validation is the
student's plain next-token loss (LMTask's), so a distilled run and a labels-only run compare directly.
"""
from __future__ import annotations

import torch

from kernels.fused_linear_distill import fused_linear_distill
from model.io import unwrap
from train.task import IGNORE, LMTask


class DistillTask(LMTask):
    def __init__(self, teacher, alpha: float, temperature: float, train_loader, val_loader=None,
                 eval_batches: int = 1, flops_per_unit: float = 0.0):
        super().__init__(train_loader, val_loader, eval_batches, 0.0, flops_per_unit)
        self.teacher, self.alpha, self.temperature = teacher.eval().requires_grad_(False), alpha, temperature

    def loss(self, model, batch):
        x, y, *doc = batch
        d = doc[0] if doc else None
        h, _ = model(x, return_hidden=True, doc_ids=d)                   # (B, T, D)
        with torch.inference_mode(), torch.autocast(x.device.type, enabled=False):
            ht = self.teacher.hidden_states(x, doc_ids=d)                # (B, T, Dt), the teacher's dtype
        ht = ht.clone()                                                  # a normal tensor outside inference mode
        w = unwrap(model).lm_head.weight                                 # (V, D)
        loss = fused_linear_distill(h.flatten(0, 1), w, ht.flatten(0, 1), self.teacher.lm_head.weight,
                                    y.flatten(), self.alpha, self.temperature, IGNORE)
        return loss, {}
