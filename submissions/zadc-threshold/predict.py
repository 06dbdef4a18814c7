"""BONBID-HIE baseline: lesion = Z-ADC < -2 inside the brain (ADC > 0).

Z-ADC maps express each voxel's ADC as a deviation from an age-matched normative atlas, in standard
deviations; strongly reduced diffusion (Z-ADC < -2) is the radiological sign of acute HIE injury. The
ADC maps are skull-stripped, so ADC > 0 is the brain.

``min_component_voxels`` removes 26-connected components with fewer voxels (0 keeps everything, which
is the challenge's baseline); raising it trades small true lesions for fewer noise false positives.
"""

from __future__ import annotations

import numpy as np


def predict(case, threshold: float = -2.0, min_component_voxels: int = 0) -> np.ndarray:
    """Boolean lesion mask of ``case`` on its native grid (array order z, y, x)."""
    adc, _ = case.load_channel("ADC")
    zadc, _ = case.load_channel("Z-ADC")
    mask = (zadc < threshold) & (adc > 0)
    if min_component_voxels > 1 and mask.any():
        import cc3d

        components = cc3d.connected_components(mask, connectivity=26)
        sizes = np.bincount(components.ravel())
        keep = sizes >= min_component_voxels
        keep[0] = False  # background
        mask = keep[components]
    return mask
