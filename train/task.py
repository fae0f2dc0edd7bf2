"""What a training method is, for the Trainer (train/trainer.py), and the language-modelling task.

A task is any object with:
    train_loader      next_batch(), state_dict(), load_state_dict(d): the position is saved in checkpoints
    unit              what one loss unit is, for the console ("tok", "pair")
    flops_per_unit    training FLOPs per loss unit, for MFU (0: no MFU)
    loss(model, batch) -> (mean loss over the batch's units, {metric name: float})
    count(batch) -> int     loss units in the batch (the Trainer weights micro-batches and ranks by it)
    evaluate(model, final) -> {name: float}   called with the unwrapped model in eval mode, under no_grad
                                       and the run's autocast; {} when there is nothing to evaluate. final:
                                       the end-of-run evaluation (LMTask reads its whole budget then, and
                                       `in_run_batches` of it, spread out, during the run)
    step_metrics(step_s) -> {name: float}   optional: called after each step with its wall time, merged into
                                            the step's metrics (GRPO: sampling and training tokens/s apart)
    sample            None, or sample(model) -> (prompt, text): after each evaluation the Trainer prints it
                      and appends it to OUT/samples.jsonl (infer.generation.PromptSampler: a fixed prompt)
`model` in loss() is the wrapped model (compile, DDP): call it, don't reach inside. A task may hold
anything else it needs (a reference model's log-probs, a tokenizer, a sampler).
"""
from __future__ import annotations

IGNORE = -100


class LMTask:
    """Next-token prediction on (x, y) or packed (x, y, doc_ids) batches; y = -100 marks positions without
    a target. Pretraining counts input tokens with a target; SFT the trained (assistant) tokens."""
    unit = "tok"

    def __init__(self, train_loader, val_loader=None, eval_batches: int = 1, z_loss: float = 0.0,
                 flops_per_unit: float = 0.0):
        self.train_loader, self.val_loader, self.eval_batches = train_loader, val_loader, eval_batches
        self.in_run_batches = eval_batches  # fewer with the automatic cadence (train.trainer.eval_batches)
        self.z_loss, self.flops_per_unit = z_loss, flops_per_unit
        self.sample = None

    def loss(self, model, batch):
        x, y, *doc = batch
        _, loss = model(x, y, z_loss=self.z_loss, doc_ids=doc[0] if doc else None)
        return loss, {}

    def count(self, batch) -> int:
        return int((batch[1] != IGNORE).sum())

    def evaluate(self, model, final: bool = True) -> dict:
        """Mean next-token loss per unit over the first `eval_batches` batches of the validation loader, or
        (final=False) over `in_run_batches` of them spread evenly (a split's first batches can be one
        unrepresentative file); a subclass changing the training loss, like distillation, is still measured
        by this one."""
        if self.val_loader is None:
            return {}
        n, k = self.eval_batches, self.eval_batches if final else min(self.in_run_batches, self.eval_batches)
        chosen = {i * n // k for i in range(k)}
        self.val_loader.reset()
        total, units = 0.0, 0
        for i in range(max(chosen) + 1):
            b = self.val_loader.next_batch()  # the skipped ones are only read: a few KB each
            if i in chosen:
                c = self.count(b)
                total += LMTask.loss(self, model, b)[0].float().item() * c   # the LM loss, also for subclasses
                units += c
        return {"val_loss": total / max(units, 1)}
