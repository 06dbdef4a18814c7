"""nnU-Net's trainer with its epoch count set from the benchmark's budget (imported only when nnU-Net trains).

Kept in its own module because defining a subclass imports nnU-Net, which :mod:`bench.models.nnunet`
must not do at import time.
"""

from __future__ import annotations

import time

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class BudgetExceededError(RuntimeError):
    """nnU-Net was about to take a training step beyond its share of the budget; it stops instead."""


class BudgetTrainer(nnUNetTrainer):
    """``nnUNetTrainer`` trained for a fixed number of optimizer steps, with per-epoch training time.

    The network, loss, augmentation, optimizer, learning-rate schedule (poly over the epochs) and
    inference are nnU-Net's own; :meth:`configure_budget` (called after construction) sets the number of
    epochs and iterations that the schedule's budget allows, and :meth:`train_step` refuses any step
    beyond ``max_steps``, so a misconfigured run fails instead of quietly training longer. nnU-Net
    records the constructor's arguments in its checkpoints and rebuilds trainers from them, so the
    constructor stays ``nnUNetTrainer``'s; because the network is unchanged, exports declare the model
    as a plain ``nnUNetTrainer``.

    ``train_seconds`` lists the wall-clock time of each epoch's training iterations (validation
    excluded), from which :mod:`bench.perf.models` computes patches per second.
    """

    max_steps: int | None = None

    def configure_budget(
        self,
        *,
        epochs: int,
        iterations_per_epoch: int,
        val_iterations_per_epoch: int | None = None,
        save_every: int | None = None,
        max_steps: int | None = None,
    ) -> None:
        if max_steps is not None and epochs * iterations_per_epoch > max_steps:
            raise BudgetExceededError(f"{epochs} epochs x {iterations_per_epoch} iterations exceed the budget of {max_steps} steps")
        self.num_epochs = int(epochs)
        self.num_iterations_per_epoch = int(iterations_per_epoch)
        if val_iterations_per_epoch is not None:
            self.num_val_iterations_per_epoch = int(val_iterations_per_epoch)
        if save_every is not None:
            self.save_every = int(save_every)
        self.max_steps = max_steps
        self.train_seconds: list[float] = []
        self._steps_in_epoch = 0

    @property
    def steps_done(self) -> int:
        """Optimizer steps taken, counting the epochs finished before a resume."""
        return self.current_epoch * self.num_iterations_per_epoch + getattr(self, "_steps_in_epoch", 0)

    def train_step(self, batch: dict) -> dict:
        if self.max_steps is not None and self.steps_done >= self.max_steps:
            raise BudgetExceededError(f"step {self.steps_done + 1} would exceed the budget of {self.max_steps} steps")
        self._steps_in_epoch += 1
        return super().train_step(batch)

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self._steps_in_epoch = 0
        self._epoch_train_start = time.perf_counter()

    def on_train_epoch_end(self, train_outputs: list[dict]) -> None:
        self.train_seconds.append(time.perf_counter() - self._epoch_train_start)
        super().on_train_epoch_end(train_outputs)

    def on_epoch_end(self) -> None:
        super().on_epoch_end()  # increments current_epoch, which now counts the finished epoch's steps
        self._steps_in_epoch = 0
