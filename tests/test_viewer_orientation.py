"""The Cases viewer shows every case in one radiological orientation, whatever its file's header.

One asymmetric phantom (brain, off-centre lesion, a prediction that misses part of it and adds a false
positive, a probability map) is stored in LPS, RAS, LAS (left-handed index frame), on an oblique grid and
as a sagittal, axis-permuted file. Every voxel keeps its physical position, so the viewer must show the
same arrays for all five: channels, reference, prediction, probability, entropy, spacing and the display
slice of each lesion centroid.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bench.app import viewer
from bench.calibration import quantize
from bench.data.acquisition import store_oriented
from bench.data.figures import display_orientation, display_transform
from bench.data.layout import DatasetWriter, write_case
from bench.imageio import Geometry, write_image

SHAPE = (8, 20, 16)
SPACING = (3.0, 0.9, 0.8)
#: Sagittal file, axes permuted: index x points Posterior, y Inferior, z Left ("PIL").
SAGITTAL_DIRECTION = (0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0)
ORIENTATIONS = ("LPS", "RAS", "LAS", "oblique", "sagittal")


def phantom() -> dict[str, np.ndarray]:
    """ADC, Z-ADC, label, prediction and probability in the generator's frame (identity direction = LPS)."""
    z, y, x = np.indices(SHAPE, dtype=float)
    brain = ((z - 3.5) / 3.8) ** 2 + ((y - 9.0) / 8.5) ** 2 + ((x - 7.0) / 7.0) ** 2 < 1.0
    lesion = ((z - 2.0) / 1.6) ** 2 + ((y - 5.0) / 2.5) ** 2 + ((x - 10.0) / 2.2) ** 2 < 1.0
    zadc = np.where(brain, np.where(lesion, -4.0, 0.5) + 0.25 * np.sin(x + 2 * y + 3 * z), 0.0).astype(np.float32)
    adc = np.where(brain, 1400.0 + 300.0 * zadc, 0.0).astype(np.float32)
    label = (lesion & brain).astype(np.uint8)
    prediction = label.copy()
    prediction[:, :, 11:] = 0  # part of the lesion missed
    prediction[5, 12:14, 3:5] = 1  # a false positive elsewhere
    probability = np.clip(0.7 * label + 0.25 * prediction + 0.03 * np.cos(y) ** 2, 0.0, 1.0)
    return {"adc": adc, "zadc": zadc, "label": label, "prediction": prediction, "probability": quantize(probability)}


def stored(orientation: str, arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], Geometry]:
    geometry = Geometry(shape=SHAPE, spacing=SPACING, origin=(-10.0, 25.5, -6.25))
    names = list(arrays)
    if orientation != "sagittal":
        oriented, stored_geometry = store_oriented([arrays[n] for n in names], geometry, orientation, np.random.default_rng(5))
        return dict(zip(names, oriented)), stored_geometry
    # (z', y', x') = (old x: left, old z reversed: inferior, old y: posterior); the origin moves to the old top slice.
    permuted = {n: np.ascontiguousarray(np.flip(a, axis=0).transpose(2, 0, 1)) for n, a in arrays.items()}
    top = geometry.origin[0] + (SHAPE[0] - 1) * SPACING[0]
    return permuted, Geometry(shape=permuted["adc"].shape, spacing=(SPACING[2], SPACING[0], SPACING[1]),
                              origin=(top, geometry.origin[1], geometry.origin[2]), direction=SAGITTAL_DIRECTION)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """The phantom in every orientation as one dataset, with each case's prediction and probability files."""
    base = tmp_path_factory.mktemp("viewer")
    source = phantom()
    files, native = {}, {}
    with DatasetWriter(base / "oriented", channel_names=("ADC", "Z-ADC")) as writer:
        for orientation in ORIENTATIONS:
            arrays, geometry = stored(orientation, source)
            case_id = f"case_{orientation}"
            writer.add(write_case(writer.root, case_id, "SiteA", (arrays["adc"], arrays["zadc"]), arrays["label"], geometry))
            prediction = write_image(arrays["prediction"], geometry, base / "predictions" / f"{case_id}.nii.gz")
            probability = write_image(arrays["probability"], geometry, base / "probabilities" / f"{case_id}.nii.gz")
            files[orientation] = (case_id, prediction, probability)
            native[orientation] = (arrays, geometry)
        dataset = writer.commit(folds=2)
    return dataset.root, files, native


def test_every_orientation_displays_the_same_arrays(cases):
    root, files, native = cases
    shown = {o: viewer.load_case_volumes(root, case_id, prediction, probability) for o, (case_id, prediction, probability) in files.items()}
    lps = shown["LPS"]
    source = phantom()
    # The generator's frame is LPS: the display of the LPS file is the phantom itself.
    np.testing.assert_array_equal(lps.reference, source["label"].astype(bool))
    assert lps.prediction is not None and lps.probability is not None
    for orientation, volumes in shown.items():
        if orientation in ("RAS", "LAS", "sagittal"):  # the files really hold other arrays
            stored_zadc = native[orientation][0]["zadc"]
            assert stored_zadc.shape != source["zadc"].shape or not np.array_equal(stored_zadc, source["zadc"])
        for name in ("ADC", "Z-ADC"):
            np.testing.assert_array_equal(volumes.channels[name], lps.channels[name], err_msg=f"{orientation} {name}")
        np.testing.assert_array_equal(volumes.reference, lps.reference, err_msg=orientation)
        np.testing.assert_array_equal(volumes.prediction, lps.prediction, err_msg=orientation)
        np.testing.assert_array_equal(volumes.probability, lps.probability, err_msg=orientation)
        np.testing.assert_array_equal(volumes.errors, lps.errors, err_msg=orientation)
        np.testing.assert_allclose(volumes.spacing, SPACING, rtol=1e-6, err_msg=orientation)
        heat = viewer.display_heat_maps(files[orientation][2], volumes.display)
        np.testing.assert_array_equal(heat["probability"], lps.probability)
        np.testing.assert_array_equal(heat["uncertainty"], viewer.entropy_map(lps.probability))
        # Anything computed on the native grid (saliency) goes there and back unchanged.
        arrays = native[orientation][0]
        np.testing.assert_array_equal(volumes.to_native(volumes.prediction), arrays["prediction"].astype(bool))
        np.testing.assert_array_equal(volumes.to_display(arrays["zadc"]), lps.channels["Z-ADC"])
    assert shown["RAS"].display.flips == (False, True, True) and shown["sagittal"].display.axes != (0, 1, 2)


def test_lesion_centroids_land_on_the_same_display_slice(cases):
    root, files, native = cases
    slices = {}
    for orientation, (case_id, prediction, _) in files.items():
        arrays, _ = native[orientation]
        volumes = viewer.load_case_volumes(root, case_id, prediction)
        rows, centroids = [], []
        for kind, stored_kind, mask in (("reference", "ref", arrays["label"]), ("predicted", "pred", arrays["prediction"])):
            centroid = np.argwhere(mask > 0).mean(axis=0)  # native voxel index (z, y, x), as the lesion rows store it
            rows.append({"kind": kind, "lesion_id": 1, "slice": int(round(centroid[0]))})
            centroids.append({"kind": stored_kind, "lesion_id": 1, "centroid_z": centroid[0], "centroid_y": centroid[1], "centroid_x": centroid[2]})
        lesions = pd.DataFrame(rows).astype({"slice": "Int64"})
        shown = viewer.display_lesion_slices(lesions, pd.DataFrame(centroids), volumes.display)
        slices[orientation] = shown["slice"].tolist()
        # The displayed reference has lesion voxels on the slice its centroid was mapped to.
        assert volumes.reference[slices[orientation][0]].any(), orientation
    assert all(value == slices["LPS"] for value in slices.values()), slices


def test_display_transform_is_dicom_orient():
    """The numpy permutation and flips are exactly SimpleITK's DICOMOrient (which figures used before)."""
    import SimpleITK as sitk

    from bench.imageio import geometry_of, to_sitk

    source = phantom()
    for orientation in ORIENTATIONS:
        arrays, geometry = stored(orientation, source)
        image = sitk.DICOMOrient(to_sitk(arrays["zadc"], geometry), "LPS")
        array, spacing = display_orientation(arrays["zadc"], geometry)
        np.testing.assert_array_equal(array, sitk.GetArrayFromImage(image), err_msg=orientation)
        np.testing.assert_allclose(spacing, geometry_of(image).spacing, err_msg=orientation)
        transform = display_transform(geometry)
        mask, _ = display_orientation(arrays["label"].astype(bool), geometry)
        assert mask.dtype == bool
        np.testing.assert_array_equal(transform.invert(transform.apply(arrays["adc"])), arrays["adc"])
