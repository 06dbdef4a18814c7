"""Region template, template fit, region volumes and the read-out record (bench.regions).

The synthetic case is the template itself carried into a neonatal-sized head by a known affine map
(scale, tilt, shift), sampled on an anisotropic native grid; a lesion placed in the right thalamus of
that case must land, voxel for voxel, in the basal-ganglia-and-thalami region of the *fitted* template.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.imageio import Geometry
from bench.regions import (
    OUTSIDE_BRAIN,
    REGION_NAMES,
    RegionMap,
    case_readout,
    fit_template,
    index_to_world,
    lesion_count,
    map_regions,
    parametric_template,
    region_volumes,
    total_volume_ml,
    world_to_index,
)

SPACING = (2.0, 1.3, 1.3)
SHAPE = (56, 110, 110)
#: Right thalamus centre of bench.data.template.REGIONS, MNI (x=R, y=A, z=S) mm -> LPS (-R, -A, S).
THALAMUS_LPS = np.array([-12.0, 18.0, 6.0])
LESION_RADIUS_MM = 2.5


def _rotation_about_z(degrees: float) -> np.ndarray:
    a = math.radians(degrees)
    return np.array([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])


def _geometry(direction: tuple[float, ...] = (1, 0, 0, 0, 1, 0, 0, 0, 1)) -> Geometry:
    """A grid centred on the world origin whatever its direction."""
    d = np.asarray(direction, float).reshape(3, 3)
    half_extent_xyz = (np.asarray(SHAPE, float)[::-1] - 1) / 2 * np.asarray(SPACING)[::-1]
    origin_xyz = -d @ half_extent_xyz
    return Geometry(shape=SHAPE, spacing=SPACING, origin=tuple(origin_xyz[::-1]), direction=tuple(float(v) for v in direction))


class SyntheticHead:
    """The template in a neonatal head: ``p_case = linear @ (p_template - template_centre) + shift``."""

    linear = _rotation_about_z(8.0) @ np.diag([0.62 * 1.04, 0.62 * 0.97, 0.62])
    shift = np.array([2.0, -3.0, 4.0])

    def __init__(self, geometry: Geometry):
        template = parametric_template()
        self.geometry = geometry
        brain_points = index_to_world(template.geometry, np.argwhere(template.labels > 0))
        self.template_centre = brain_points.mean(axis=0)
        grid = np.indices(SHAPE).reshape(3, -1).T
        points = index_to_world(geometry, grid)
        back = (points - self.shift) @ np.linalg.inv(self.linear).T + self.template_centre
        index = np.rint(world_to_index(template.geometry, back)).astype(int)
        inside = np.all((index >= 0) & (index < np.asarray(template.labels.shape)), axis=1)
        labels = np.zeros(len(grid), np.uint8)
        labels[inside] = template.labels[tuple(index[inside].T)]
        self.true_labels = labels.reshape(SHAPE)
        self.brain = self.true_labels > 0
        centre = self.linear @ (THALAMUS_LPS - self.template_centre) + self.shift
        distance = np.linalg.norm(points - centre, axis=1).reshape(SHAPE)
        self.lesion = (distance <= LESION_RADIUS_MM) & (self.true_labels == REGION_NAMES.index("basal_ganglia_thalami") + 1)


@pytest.fixture(scope="module")
def head() -> SyntheticHead:
    return SyntheticHead(_geometry())


def test_template_is_a_partition_of_the_brain_with_every_region():
    template = parametric_template()
    counts = np.bincount(template.labels.ravel(), minlength=len(REGION_NAMES) + 1)
    assert counts.size == len(REGION_NAMES) + 1
    assert np.all(counts[1:] > 0), dict(zip(REGION_NAMES, counts[1:]))
    assert template.filled.min() >= 1  # every grid voxel has a nearest region
    assert parametric_template() is template  # memoised


def test_fit_recovers_the_known_scale_and_shift(head: SyntheticHead):
    fit = fit_template(head.brain, head.geometry)
    assert fit.method == "principal_axes"
    assert np.allclose(fit.case_center, head.shift, atol=1.0)
    assert sorted(fit.scales) == pytest.approx(sorted([0.62 * 1.04, 0.62 * 0.97, 0.62]), abs=0.02)
    assert fit.rotation_deg == pytest.approx(8.0, abs=2.0)
    assert fit.truncated_axes == ()


def test_thalamic_lesion_lands_in_basal_ganglia_thalami_with_exact_volume(head: SyntheticHead):
    regions = map_regions(head.brain, head.geometry)
    n = int(head.lesion.sum())
    assert n >= 8
    volumes = region_volumes(head.lesion, SPACING, regions)
    voxel_ml = SPACING[0] * SPACING[1] * SPACING[2] / 1000.0
    assert volumes["basal_ganglia_thalami"] == pytest.approx(n * voxel_ml, rel=1e-12)
    assert all(ml == 0.0 for name, ml in volumes.items() if name != "basal_ganglia_thalami")
    assert total_volume_ml(head.lesion, SPACING) == pytest.approx(n * voxel_ml, rel=1e-12)
    assert lesion_count(head.lesion) == 1
    # the fitted map agrees with the true one on most of the brain
    agree = np.mean(regions.labels[head.brain] == head.true_labels[head.brain])
    assert agree > 0.85


def test_region_volumes_sum_to_total_and_count_outside_brain():
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[1:3, 1:4, 1:5] = 1
    labels[2, 2, 2:4] = 10
    regions = RegionMap(labels, REGION_NAMES, (2.0, 1.0, 0.5))
    lesion = np.zeros_like(labels, bool)
    lesion[2, 2, 1:5] = True  # 2 voxels region 1, 2 voxels cerebellum
    lesion[0, 0, 0] = True  # outside the brain
    volumes = region_volumes(lesion, (2.0, 1.0, 0.5), regions)
    assert volumes["basal_ganglia_thalami"] == 2 * 0.001
    assert volumes["cerebellum"] == 2 * 0.001
    assert volumes[OUTSIDE_BRAIN] == 0.001
    assert sum(volumes.values()) == pytest.approx(total_volume_ml(lesion, (2.0, 1.0, 0.5)))
    assert set(volumes) == {*REGION_NAMES, OUTSIDE_BRAIN}


def test_orientation_comes_from_the_header(head: SyntheticHead):
    """The same head stored RAS-style (x and y axes reversed) gives the same region volumes."""
    flipped = SyntheticHead(_geometry((-1, 0, 0, 0, -1, 0, 0, 0, 1)))
    assert flipped.lesion.sum() == head.lesion.sum()
    assert not np.array_equal(flipped.lesion, head.lesion)
    a = region_volumes(head.lesion, SPACING, map_regions(head.brain, head.geometry))
    b = region_volumes(flipped.lesion, SPACING, map_regions(flipped.brain, flipped.geometry))
    assert a == pytest.approx(b)


def test_truncated_field_of_view_is_recorded(head: SyntheticHead):
    top = np.flatnonzero(head.brain.any(axis=(1, 2)))[-1]
    cut = head.brain[: top - 5]  # the slab stops 5 slices below the vertex
    geometry = Geometry(shape=cut.shape, spacing=SPACING, origin=head.geometry.origin, direction=head.geometry.direction)
    assert 0 in fit_template(cut, geometry).truncated_axes


def test_case_readout_predicted_beside_reference(head: SyntheticHead):
    regions = map_regions(head.brain, head.geometry)
    prediction = head.lesion.copy()
    extra = np.zeros_like(prediction)
    extra[20, 10, 10] = True  # a false positive outside the brain
    prediction |= extra
    readout = case_readout("case-1", prediction, SPACING, regions, head.lesion)
    voxel_ml = SPACING[0] * SPACING[1] * SPACING[2] / 1000.0
    assert readout.predicted_count == 2 and readout.reference_count == 1
    assert readout.error_ml == pytest.approx(voxel_ml)
    rows = {r.region: r for r in readout.regions}
    assert rows["basal_ganglia_thalami"].error_ml == 0.0
    assert rows[OUTSIDE_BRAIN].error_ml == pytest.approx(voxel_ml)
    assert readout.involved_reference == ("basal_ganglia_thalami",)
    assert "basal_ganglia_thalami" in readout.involved_predicted
    assert len(readout.rows()) == len(REGION_NAMES) + 1
    no_reference = case_readout("case-1", prediction, SPACING, regions)
    assert no_reference.reference_ml is None and no_reference.regions[0].error_ml is None
