"""nnU-Net's trainer with a shorter, configurable schedule (imported only when nnU-Net trains).

Kept in its own module because defining a subclass imports nnU-Net, which :mod:`bench.models.nnunet`
must not do at import time.
"""

from __future__ import annotations

import time

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from bench.models.recipe import NnUNetSchedule


class ShortScheduleTrainer(nnUNetTrainer):
    """``nnUNetTrainer`` with a configurable (shorter) schedule and per-epoch training time.

    The network, loss, augmentation and inference are nnU-Net's own; only the number of epochs and
    iterations (and the checkpoint interval) change, set by :meth:`configure_schedule` after
    construction: nnU-Net records the constructor's arguments in its checkpoints and rebuilds trainers
    from them, so the constructor must stay ``nnUNetTrainer``'s. Because the network is unchanged,
    exports declare the model as a plain ``nnUNetTrainer``.

    ``train_seconds`` lists the wall-clock time of each epoch's training iterations (validation
    excluded), from which :mod:`bench.models.perf` computes patches per second.
    """

    def configure_schedule(self, schedule: NnUNetSchedule) -> None:
        if schedule.epochs is not None:
            self.num_epochs = schedule.epochs
        if schedule.iterations_per_epoch is not None:
            self.num_iterations_per_epoch = schedule.iterations_per_epoch
        if schedule.val_iterations_per_epoch is not None:
            self.num_val_iterations_per_epoch = schedule.val_iterations_per_epoch
        if schedule.save_every is not None:
            self.save_every = schedule.save_every
        self.train_seconds: list[float] = []

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self._epoch_train_start = time.perf_counter()

    def on_train_epoch_end(self, train_outputs: list[dict]) -> None:
        self.train_seconds.append(time.perf_counter() - self._epoch_train_start)
        super().on_train_epoch_end(train_outputs)
