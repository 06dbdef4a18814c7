"""Names and defaults that more than one stage of the pipeline uses, defined once.

Everything here is plain data with no imports beyond the standard library, so any module (the CLI, the
app, the store, the harness) can import it without pulling in torch or SQL. A rule that needs code (the
worst-value rule, the mask check, the device choice) lives in the one module that owns it; only its
names and default numbers are here.
"""

from __future__ import annotations

from typing import Literal

#: Evaluation protocols. ``kfold``: site-stratified k-fold; ``loso``: leave one site out; ``holdout``: one
#: stored, site-stratified train/test split (the protocol to set beside a challenge leaderboard).
ProtocolName = Literal["kfold", "loso", "holdout"]
PROTOCOLS: tuple[str, ...] = ("kfold", "loso", "holdout")
#: The protocols the demo and the app's comparison views run by default.
CROSS_VALIDATION_PROTOCOLS: tuple[str, ...] = ("kfold", "loso")
DEFAULT_PROTOCOL = "kfold"

#: The metric convention used when none is named (see docs/metrics.md).
DEFAULT_CONVENTION = "bench"
#: Tolerance of the normalised surface Dice (NSD), in mm, as BONBID-HIE scored it.
DEFAULT_NSD_TOLERANCE_MM = 2.0

#: How predicted lesions are matched to reference lesions (see bench.lesionwise.MATCH_RULES):
#: one-to-one by IoU (as panoptica), so a fragmented prediction is not rewarded.
DEFAULT_LESION_RULE = "one_to_one"

#: Training schedules of trainable submissions. ``auto``: ``gpu`` when torch can use a CUDA device.
SCHEDULES: tuple[str, ...] = ("auto", "cpu", "gpu")
DEFAULT_SCHEDULE = "auto"

#: Status of a stored case row.
CASE_OK = "ok"
CASE_FAILED = "failed"

#: Share of each fold's training cases an entrant trains on by default (``bench run --train-fraction``
#: runs learning curves below it). Leaderboards show runs at this fraction unless asked otherwise.
FULL_TRAINING = 1.0
