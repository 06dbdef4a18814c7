"""The per-case read-out page (bench.readout): self-contained, atomic, with the tables."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from bench.imageio import Geometry
from bench.readout import _View, render_readout, write_readout

SHAPE = (24, 64, 56)
SPACING = (4.0, 1.8, 1.8)


@dataclass
class FakeCase:
    """The few things the page reads from a :class:`bench.data.dataset.Case`."""

    case_id: str = "SiteA_007"
    site: str = "SiteA"
    channel_names: tuple[str, ...] = ("ADC", "Z-ADC")
    adc: np.ndarray = field(default_factory=lambda: _head()[0])
    geometry: Geometry = field(default_factory=lambda: Geometry(SHAPE, SPACING, (-46.0, -56.7, -49.5)))

    def load_channel(self, index_or_name):
        return self.adc, self.geometry


def _head() -> tuple[np.ndarray, np.ndarray]:
    """An ellipsoidal "brain" (ADC ~1400, ventricle-like core 2800) and a lesion in it."""
    z, y, x = np.indices(SHAPE, dtype=float)
    r = np.sqrt(((z - 11.5) * SPACING[0] / 44) ** 2 + ((y - 31.5) * SPACING[1] / 56) ** 2 + ((x - 27.5) * SPACING[2] / 46) ** 2)
    adc = np.where(r < 1, 1400.0, 0.0) + np.where(r < 0.25, 1400.0, 0.0)
    lesion = (np.abs(z - 12) <= 1) & (np.abs(y - 36) <= 3) & (np.abs(x - 22) <= 3)
    adc[lesion] = 600.0
    return adc.astype(np.float32), lesion


@pytest.fixture(scope="module")
def page_inputs():
    case = FakeCase()
    _, lesion = _head()
    prediction = np.roll(lesion, 2, axis=2)
    prediction[12, 10, 28] = True  # a small false positive
    probability = np.clip(lesion * 0.7 + prediction * 0.25, 0, 1).astype(np.float32)
    from bench.uncertainty import binary_entropy

    return case, prediction, lesion, probability, binary_entropy(probability)


def _no_remote(text: str) -> None:
    assert "http://" not in text and "https://" not in text
    assert not re.search(r"""(src|href)=['"](?!data:)""", text)  # every image is inline
    assert "<script" not in text


def test_page_is_written_self_contained_with_tables(tmp_path: Path, page_inputs):
    case, prediction, lesion, probability, uncertainty = page_inputs
    out = write_readout(case, prediction, tmp_path / "case.html", probability=probability, uncertainty=uncertainty,
                        reference=lesion, submission="unet-monai")
    text = out.read_text(encoding="utf-8")
    _no_remote(text)
    assert text.startswith("<!DOCTYPE html>") and text.endswith("</html>")
    assert "<table id='regions'" in text and "Total lesion volume (ml)" in text and "Lesion count" in text
    assert "unet-monai" in text and "SiteA_007" in text
    assert text.count("data:image/png;base64,") >= 1
    assert "Brier score" in text and "false positive" in text and "matches reference" in text
    expected_ml = lesion.sum() * np.prod(SPACING) / 1000
    assert f"{expected_ml:.2f}" in text  # reference total volume
    assert [p.name for p in tmp_path.iterdir()] == ["case.html"]  # no temporary file left behind


def test_missing_inputs_say_not_available(tmp_path: Path, page_inputs):
    case, prediction, *_ = page_inputs
    text = write_readout(case, prediction, tmp_path / "p.html").read_text(encoding="utf-8")
    _no_remote(text)
    assert "Uncertainty</b>: not available" in text
    assert "Calibration</b>: not available" in text
    assert "No reference segmentation" in text
    empty = write_readout(case, np.zeros(SHAPE, bool), tmp_path / "e.html").read_text(encoding="utf-8")
    assert "No lesion predicted" in empty


def test_failed_render_leaves_the_previous_page(tmp_path: Path, page_inputs, monkeypatch):
    case, prediction, *_ = page_inputs
    out = write_readout(case, prediction, tmp_path / "case.html", max_slices=1)
    before = out.read_bytes()

    def broken(*args, **kwargs):
        raise RuntimeError("render failed")

    monkeypatch.setattr("bench.readout._slice_figure", broken)
    with pytest.raises(RuntimeError):
        write_readout(case, prediction, out, reference=prediction)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["case.html"]


def test_shape_mismatch_is_refused(page_inputs):
    case, prediction, *_ = page_inputs
    with pytest.raises(ValueError, match="shape"):
        render_readout(case, prediction[:, :, :-1])


def test_view_puts_anterior_up_and_patient_right_on_the_left():
    identity = Geometry((2, 3, 4), (1.0, 1.0, 1.0))
    array = np.arange(24).reshape(2, 3, 4)
    assert np.array_equal(_View.of(identity)(array), array)  # LPS arrays are already in display order
    ras = Geometry((2, 3, 4), (3.0, 2.0, 1.0), direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1))
    view = _View.of(ras)
    assert np.array_equal(view(array), array[:, ::-1, ::-1])
    swapped = Geometry((2, 3, 4), (3.0, 2.0, 1.0), direction=(0, 1, 0, 1, 0, 0, 0, 0, 1))  # x index -> P, y index -> L
    assert view.spacing == (3.0, 2.0, 1.0)
    assert _View.of(swapped)(array).shape == (2, 4, 3)
