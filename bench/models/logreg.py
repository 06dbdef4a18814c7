"""Voxel-wise logistic regression on Z-ADC: a trainable calibration point (``trainer: logreg``).

A logistic regression on a few per-voxel features placed mid-table in BONBID-HIE 2023 (Dice 0.56); run
under the benchmark's protocols it says where a model with no spatial context lands on a dataset,
between the fixed Z-ADC < -2 threshold (``zadc-threshold``) and the networks. It is fitted like every
trainable entrant, per fold and on that fold's training cases only, so it is a fair calibration point.

Contract:

* :class:`LogRegRecipe` is the ``recipe`` of a ``trainable`` submission with ``trainer: logreg``
  (validated like the other recipes: unknown fields are errors); :class:`LogRegTrainable` implements
  :class:`bench.predictor.Trainable` and :class:`LogRegPredictor` :class:`bench.predictor.Predictor`.
* Inputs are the **native** channels ``ADC`` and ``Z-ADC`` of each case (no resampling, no cropping:
  every feature is per voxel or a neighbourhood in millimetres); of the benchmark's preprocessing only
  the channel list is used, as for nnU-Net. The brain is ``ADC > 0`` (skull-stripped maps, as the
  BONBID-HIE baseline assumes); outside it nothing is predicted.
* ``fit`` samples brain voxels of the training cases, class-balanced (:meth:`LogRegTrainable.sample`),
  fits the weights by Newton's method / IRLS with an L2 penalty (:func:`fit_logistic`, numpy only), then
  chooses the probability threshold that maximises the mean per-case Dice on the validation cases
  (the training cases when there are none): a class-balanced fit over-predicts lesion at 0.5, so the
  threshold is a fitted parameter, chosen on cases the weights were not fitted on.
* Run folder: ``run.json`` (:func:`~bench.models.runfolder.claim_run_dir`), ``model.json`` (the fitted
  model; its presence means "done", and a new ``fit`` just loads it) and ``train.log``.

Both schedules run on the CPU (numpy); the ``gpu`` schedule only samples more voxels.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from bench.imageio import write_text_atomic
from bench.models.runfolder import append_log, claim_run_dir, read_budget_used, record_training

if TYPE_CHECKING:
    from bench.data.dataset import Case
    from bench.models.recipe import BudgetUsed
    from bench.preprocess import PreprocessingConfig

#: The fitted model inside a run folder (its presence means the fold is trained).
LOGREG_MODEL_FILE = "model.json"
#: Version of ``model.json``.
LOGREG_MODEL_FORMAT = 1

#: Per-voxel features. ``zadc``: Z-ADC; ``adc``: ADC in 10^-3 mm^2/s; ``adc_rel``: ADC over the case's
#: median brain ADC (robust to a site's intensity scale); ``*_mean``: the mean of that feature over the
#: brain voxels within ``neighbourhood_mm`` (a box, in millimetres along each axis).
FeatureName = Literal["zadc", "adc", "adc_rel", "zadc_mean", "adc_mean", "adc_rel_mean"]
FEATURES: tuple[str, ...] = ("zadc", "adc", "adc_rel", "zadc_mean", "adc_mean", "adc_rel_mean")
#: Channel names the features read (``bench.data`` channel names).
ADC_CHANNEL, ZADC_CHANNEL = "ADC", "Z-ADC"

LogRegScheduleName = Literal["cpu", "gpu"]


class LogRegError(RuntimeError):
    """The regression cannot be fitted (no lesion voxel, a case without label or channel); names the case."""


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LogRegSchedule(_Config):
    """How much data the fit sees."""

    #: Voxels sampled per class (lesion, background) over all training cases, spread evenly over the
    #: cases so that large brains do not dominate; a class with fewer voxels contributes all of them.
    voxels_per_class: int = Field(ge=100)
    #: Newton iterations at most (the fit usually converges in under ten).
    max_iterations: int = Field(50, ge=1)


class LogRegRecipe(_Config):
    """Recipe of the logistic-regression trainer::

        trainer: logreg
        seed: 0
        features: [zadc, zadc_mean, adc_rel, adc_rel_mean]
        neighbourhood_mm: 4.0
        l2: 1.0e-3
        class_balance: true
        threshold: validation          # or a probability in (0, 1)
        schedules:
          cpu: {voxels_per_class: 20000}
          gpu: {voxels_per_class: 200000}
    """

    trainer: Literal["logreg"]
    seed: int = 0
    features: tuple[FeatureName, ...] = ("zadc", "zadc_mean", "adc_rel", "adc_rel_mean")
    #: Half-width of the neighbourhood of the ``*_mean`` features, in mm along each axis (an axis whose
    #: spacing exceeds it is not averaged over: thick slices stay separate).
    neighbourhood_mm: float = Field(4.0, gt=0)
    #: L2 penalty on the standardised weights (not the intercept); keeps separable data finite.
    l2: float = Field(1e-3, ge=0)
    #: Weigh the sampled lesion and background voxels to equal totals.
    class_balance: bool = True
    #: ``validation``: the candidate threshold with the best mean validation Dice; a number: that threshold.
    threshold: Literal["validation"] | float = "validation"
    #: Candidate thresholds when choosing on the validation cases, evenly spaced in logit from -8 to 8
    #: (P = 0.0003 to 0.9997): a class-balanced fit puts the best threshold close to 1 when lesions
    #: are rare, where a grid even in probability would have few candidates.
    threshold_candidates: int = Field(99, ge=3)
    schedules: dict[LogRegScheduleName, LogRegSchedule]

    @field_validator("features")
    @classmethod
    def _distinct(cls, features: tuple[str, ...]) -> tuple[str, ...]:
        if not features or len(set(features)) != len(features):
            raise ValueError(f"features must be a non-empty list of distinct names, got {list(features)}")
        return features

    @field_validator("threshold")
    @classmethod
    def _probability(cls, threshold: Any) -> Any:
        if not isinstance(threshold, str) and not 0 < float(threshold) < 1:
            raise ValueError(f"threshold must be 'validation' or a probability in (0, 1), got {threshold}")
        return threshold


# --------------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------------


def case_features(case: "Case", features: Sequence[str], neighbourhood_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """``(brain mask (z, y, x) bool, features (n_brain_voxels, n_features) float32)`` of one case."""
    for channel in (ADC_CHANNEL, ZADC_CHANNEL):
        if channel not in case.channel_names:
            raise LogRegError(f"case {case.case_id}: the logistic regression needs channel {channel!r}, the case has {list(case.channel_names)}")
    adc, geometry = case.load_channel(ADC_CHANNEL)
    zadc, _ = case.load_channel(ZADC_CHANNEL)
    brain = adc > 0
    if not brain.any():
        return brain, np.zeros((0, len(features)), np.float32)
    median = float(np.median(adc[brain]))
    base = {"zadc": zadc, "adc": adc / 1000.0, "adc_rel": adc / median if median > 0 else adc}
    columns = []
    for name in features:
        source = base[name.removesuffix("_mean")]
        value = _brain_mean(source, brain, geometry.spacing, neighbourhood_mm) if name.endswith("_mean") else source
        columns.append(value[brain].astype(np.float32))
    return brain, np.stack(columns, axis=1)


def _brain_mean(values: np.ndarray, brain: np.ndarray, spacing: Sequence[float], radius_mm: float) -> np.ndarray:
    """Mean of ``values`` over the brain voxels of a box of half-width ``radius_mm`` around each voxel
    (normalised convolution: voxels outside the brain do not pull the mean towards 0 at its edge)."""
    from scipy.ndimage import uniform_filter

    size = tuple(2 * int(math.floor(radius_mm / float(s))) + 1 for s in spacing)
    mask = brain.astype(np.float32)
    total = uniform_filter(np.where(brain, values, 0).astype(np.float32), size=size, mode="constant")
    count = uniform_filter(mask, size=size, mode="constant")
    return np.divide(total, count, out=np.zeros_like(total), where=count > 1e-6)


# --------------------------------------------------------------------------------------------------
# The regression
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogisticFit:
    """Weights of a fitted logistic regression on standardised features (``coefficients[0]`` is the
    intercept), with the standardisation and how the fit went."""

    coefficients: tuple[float, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    iterations: int
    converged: bool

    def probability(self, x: np.ndarray) -> np.ndarray:
        """P(lesion) for raw features ``x`` ``(n, d)``."""
        z = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.scale, np.float32)
        beta = np.asarray(self.coefficients, np.float64)
        return _sigmoid(beta[0] + z.astype(np.float64) @ beta[1:])


def _sigmoid(t: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * t))  # overflow-free


def fit_logistic(
    x: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None, *, l2: float = 1e-3, max_iterations: int = 50, tolerance: float = 1e-8
) -> LogisticFit:
    """Weighted, L2-penalised logistic regression by Newton's method (IRLS) with step halving.

    Minimises ``mean(w * logloss) + l2 / 2 * |beta[1:]|^2`` over standardised features (the intercept is
    not penalised). The problem is convex and has a handful of parameters, so Newton converges in a few
    steps; halving a step that does not decrease the objective guards the first steps on badly scaled data.
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    n, d = x.shape
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    w = w * (n / w.sum())
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-12] = 1.0  # a constant feature: leave it unscaled (its weight is then ~0 under L2)
    design = np.hstack([np.ones((n, 1)), (x - mean) / scale])
    penalty = np.full(d + 1, l2)
    penalty[0] = 0.0

    def objective(beta: np.ndarray) -> float:
        t = design @ beta
        # log(1 + e^t) - y t, computed stably
        loss = np.logaddexp(0.0, t) - y * t
        return float(np.mean(w * loss) + 0.5 * np.sum(penalty * beta**2))

    beta = np.zeros(d + 1)
    prior = float(np.clip(np.average(y, weights=w), 1e-6, 1 - 1e-6))
    beta[0] = math.log(prior / (1 - prior))
    current = objective(beta)
    converged = False
    iteration = 0
    for iteration in range(1, max_iterations + 1):
        p = _sigmoid(design @ beta)
        gradient = design.T @ (w * (p - y)) / n + penalty * beta
        hessian = (design * (w * p * (1 - p))[:, None]).T @ design / n + np.diag(penalty) + 1e-10 * np.eye(d + 1)
        step = np.linalg.solve(hessian, gradient)
        factor = 1.0
        while True:
            candidate = beta - factor * step
            value = objective(candidate)
            if value <= current + 1e-12 or factor < 1e-4:
                break
            factor /= 2
        beta, current = candidate, value
        if np.max(np.abs(factor * step)) < tolerance * (1 + np.max(np.abs(beta))):
            converged = True
            break
    return LogisticFit(tuple(map(float, beta)), tuple(map(float, mean)), tuple(map(float, scale)), iteration, converged)


def dice_by_threshold(probabilities: np.ndarray, labels: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Dice of ``probabilities > t`` against ``labels`` for every threshold ``t`` (one case's brain
    voxels); a case with no lesion counts 1 when nothing is predicted, else 0 (the benchmark's rule)."""
    order = np.argsort(-probabilities, kind="stable")
    p_sorted = probabilities[order]
    hits = np.concatenate([[0], np.cumsum(labels[order].astype(np.int64))])
    # number of voxels strictly above each threshold (p_sorted is descending)
    predicted = np.searchsorted(-p_sorted, -thresholds, side="left")
    true_positives = hits[predicted]
    reference = int(labels.sum())
    denominator = predicted + reference
    return np.where(denominator == 0, 1.0, 2.0 * true_positives / np.maximum(denominator, 1))


# --------------------------------------------------------------------------------------------------
# Trainable and predictor
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogRegModel:
    """What ``model.json`` holds: the features, the fitted weights and the chosen threshold."""

    features: tuple[str, ...]
    neighbourhood_mm: float
    fit: LogisticFit
    threshold: float
    #: ``validation``, ``training`` (no validation cases) or ``fixed`` (the recipe's number).
    threshold_source: str
    info: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": LOGREG_MODEL_FORMAT,
            "features": list(self.features),
            "neighbourhood_mm": self.neighbourhood_mm,
            "coefficients": list(self.fit.coefficients),
            "mean": list(self.fit.mean),
            "scale": list(self.fit.scale),
            "iterations": self.fit.iterations,
            "converged": self.fit.converged,
            "threshold": self.threshold,
            "threshold_source": self.threshold_source,
            "info": self.info,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "LogRegModel":
        if data.get("format") != LOGREG_MODEL_FORMAT:
            raise LogRegError(f"model.json format {data.get('format')!r} is not {LOGREG_MODEL_FORMAT}")
        fit = LogisticFit(tuple(data["coefficients"]), tuple(data["mean"]), tuple(data["scale"]), int(data["iterations"]), bool(data["converged"]))
        return cls(tuple(data["features"]), float(data["neighbourhood_mm"]), fit, float(data["threshold"]), str(data["threshold_source"]), dict(data.get("info", {})))


class LogRegPredictor:
    """Predicts ``brain & P(lesion) > threshold`` on the case's native grid."""

    def __init__(self, model: LogRegModel) -> None:
        self.model = model
        #: What the fit used of the training budget (set by ``fit``; a closed-form fit uses none of it).
        self.budget_used: "BudgetUsed | None" = None

    @classmethod
    def from_run_dir(cls, run_dir: Path) -> "LogRegPredictor":
        path = Path(run_dir) / LOGREG_MODEL_FILE
        try:
            return cls(LogRegModel.from_json(json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, json.JSONDecodeError, KeyError) as exc:
            raise LogRegError(f"{path}: not a readable logistic-regression model ({exc}); delete the run folder to refit") from exc

    def probabilities(self, case: "Case") -> tuple[np.ndarray, np.ndarray]:
        """``(brain mask, P(lesion) of each brain voxel)``."""
        brain, x = case_features(case, self.model.features, self.model.neighbourhood_mm)
        return brain, self.model.fit.probability(x) if len(x) else np.zeros(0)

    def predict(self, case: "Case") -> np.ndarray:
        return self.predict_with_probability(case).mask

    def predict_with_probability(self, case: "Case"):
        """The mask and the lesion probability map (0 outside the brain), from one pass over the features."""
        from bench.submissions.guard import Prediction

        brain, p = self.probabilities(case)
        probability = np.zeros(brain.shape, np.float32)
        probability[brain] = p
        return Prediction(mask=brain & (probability > self.model.threshold), probability=probability)


class LogRegTrainable:
    """A ``trainer: logreg`` recipe bound to a schedule (see the module docstring).

    The keyword arguments are those :func:`bench.models.build_trainable` passes every trainer; only the
    channel list of ``preprocessing`` is used (it must hold ``ADC`` and ``Z-ADC``).
    """

    def __init__(
        self,
        recipe: LogRegRecipe,
        schedule_name: LogRegScheduleName,
        *,
        preprocessing: "PreprocessingConfig | None" = None,
        submission_dir: Path | None = None,
        cache_dir: Path | None = None,
        device: str | None = None,
        source: dict[str, Any] | None = None,
    ) -> None:
        from bench.models.recipe import bound_schedule  # recipe imports this module: import at use

        self.recipe = recipe
        self.schedule_name = schedule_name
        self.schedule = bound_schedule(recipe, schedule_name)
        self.channels: tuple[str, ...] = tuple(preprocessing.channels) if preprocessing is not None else (ADC_CHANNEL, ZADC_CHANNEL)
        missing = [c for c in (ADC_CHANNEL, ZADC_CHANNEL) if c not in self.channels]
        if missing:
            raise ValueError(f"the logistic regression reads channels ADC and Z-ADC; inputs.channels lacks {missing}")
        self.source = dict(source or {})

    def identity(self, train_cases: Sequence["Case"], val_cases: Sequence["Case"]) -> dict[str, Any]:
        """What makes two fits the same (recorded in ``run.json``)."""
        return {
            "trainer": "logreg",
            "recipe": self.recipe.model_dump(mode="json"),
            "schedule": self.schedule_name,
            "channels": list(self.channels),
            "train_cases": [c.case_id for c in train_cases],
            "val_cases": [c.case_id for c in val_cases],
        }

    def fit(self, train_cases: Sequence["Case"], val_cases: Sequence["Case"], run_dir: Path) -> LogRegPredictor:
        """Fit on ``train_cases``, choose the threshold on ``val_cases`` (or load the finished fit)."""
        run_dir = Path(run_dir)
        if not train_cases:
            raise LogRegError("fit() needs at least one training case")
        claim_run_dir(run_dir, self.identity(train_cases, val_cases), info={"source": self.source})
        if not (run_dir / LOGREG_MODEL_FILE).is_file():
            model = self._fit(list(train_cases), list(val_cases), run_dir)
            write_text_atomic(run_dir / LOGREG_MODEL_FILE, json.dumps(model.to_json(), indent=1) + "\n")
            append_log(run_dir, f"finished: {run_dir / LOGREG_MODEL_FILE}")
        predictor = LogRegPredictor.from_run_dir(run_dir)
        predictor.budget_used = read_budget_used(run_dir)
        if predictor.budget_used is None:  # recorded once, beside the fit (a reloaded fold reads it back)
            predictor.budget_used = self.closed_form_budget()
            record_training(run_dir, {"budget": predictor.budget_used.to_dict(), "fit": "closed-form (Newton / IRLS)"})
        return predictor

    def closed_form_budget(self) -> "BudgetUsed":
        """A closed-form fit takes no gradient step: 0 of the schedule's patch-voxel budget, recorded as
        every entrant's is, so its card says so instead of "does not train"."""
        from bench.models.recipe import BUDGET_UNIT, BudgetUsed, training_budget

        planned = training_budget(self.schedule_name).planned
        return BudgetUsed(schedule=self.schedule_name, unit=BUDGET_UNIT, planned=planned, used=0, steps=0, batch_size=0, patch_size=(), requested=0)

    def sample(self, cases: Sequence["Case"]) -> tuple[np.ndarray, np.ndarray]:
        """Class-balanced sample of brain voxels of ``cases``: ``(features (n, d), labels (n,))``.

        Each case gives up to ``voxels_per_class / len(cases)`` lesion and as many background voxels,
        drawn without replacement from a generator keyed by (seed, case index), so the sample depends
        only on the recipe, the schedule and the cases.
        """
        quota = int(math.ceil(self.schedule.voxels_per_class / len(cases)))
        xs, ys = [], []
        for index, case in enumerate(cases):
            if case.label_path is None:
                raise LogRegError(f"case {case.case_id} has no reference label; it cannot be used for training")
            brain, x = case_features(case, self.recipe.features, self.recipe.neighbourhood_mm)
            y = case.load_label()[brain]
            rng = np.random.default_rng([self.recipe.seed, index])
            for cls in (True, False):
                where = np.flatnonzero(y == cls)
                chosen = where if len(where) <= quota else rng.choice(where, quota, replace=False)
                xs.append(x[chosen])
                ys.append(np.full(len(chosen), cls))
        return np.concatenate(xs), np.concatenate(ys)

    def _fit(self, train_cases: list["Case"], val_cases: list["Case"], run_dir: Path) -> LogRegModel:
        start = time.perf_counter()
        x, y = self.sample(train_cases)
        n_lesion, n_background = int(y.sum()), int((~y).sum())
        if n_lesion == 0 or n_background == 0:
            raise LogRegError(f"the training cases have {n_lesion} lesion and {n_background} background brain voxels; both are needed")
        weights = np.where(y, 0.5 / n_lesion, 0.5 / n_background) if self.recipe.class_balance else None
        fit = fit_logistic(x, y, weights, l2=self.recipe.l2, max_iterations=self.schedule.max_iterations)
        append_log(
            run_dir,
            f"fitted on {n_lesion} lesion and {n_background} background voxels of {len(train_cases)} cases "
            f"in {fit.iterations} Newton steps ({'converged' if fit.converged else 'not converged'})",
        )
        interim = LogRegModel(tuple(self.recipe.features), self.recipe.neighbourhood_mm, fit, 0.5, "fixed", {})
        if isinstance(self.recipe.threshold, str):
            chooser = val_cases or train_cases
            threshold, dice = choose_threshold(LogRegPredictor(interim), chooser, self.recipe.threshold_candidates)
            source = "validation" if val_cases else "training"
            append_log(run_dir, f"threshold {threshold:.3f} (mean Dice {dice:.3f} on the {len(chooser)} {source} cases)")
        else:
            threshold, dice, source = float(self.recipe.threshold), None, "fixed"
        info = {
            "schedule": self.schedule_name,
            "train_cases": [c.case_id for c in train_cases],
            "val_cases": [c.case_id for c in val_cases],
            "lesion_voxels": n_lesion,
            "background_voxels": n_background,
            "threshold_dice": dice,
            "fit_s": time.perf_counter() - start,
        }
        return LogRegModel(tuple(self.recipe.features), self.recipe.neighbourhood_mm, fit, threshold, source, info)


#: Range of the candidate thresholds, in logit.
THRESHOLD_LOGIT_RANGE = (-8.0, 8.0)


def threshold_grid(candidates: int) -> np.ndarray:
    """``candidates`` probabilities evenly spaced in logit over :data:`THRESHOLD_LOGIT_RANGE`."""
    return _sigmoid(np.linspace(*THRESHOLD_LOGIT_RANGE, candidates))


def choose_threshold(predictor: LogRegPredictor, cases: Sequence["Case"], candidates: int) -> tuple[float, float]:
    """The candidate threshold with the best mean per-case Dice over ``cases``, and that Dice.

    Ties go to the middle of the best run of thresholds, so a plateau (common on few cases) does not
    push the choice to its edge.
    """
    thresholds = threshold_grid(candidates)
    scores = []
    for case in cases:
        brain, p = predictor.probabilities(case)
        scores.append(dice_by_threshold(p, case.load_label()[brain], thresholds))
    mean = np.mean(scores, axis=0)
    best = np.isclose(mean, mean.max())
    first = int(np.argmax(best))
    last = first
    while last + 1 < len(best) and best[last + 1]:
        last += 1
    chosen = (first + last) // 2
    return float(thresholds[chosen]), float(mean[chosen])
