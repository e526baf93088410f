"""Per-channel intensity normalisation schemes, named as in nnU-Net v2 plans."""

from __future__ import annotations

import numpy as np

# nnU-Net's channel-name rule: "CT" gets CT normalisation, everything else a z-score unless named otherwise.
SCHEME_FOR_CHANNEL_NAME = {"ct": "CTNormalization", "nonorm": "NoNormalization", "zscore": "ZScoreNormalization",
                           "rescale_to_0_1": "RescaleTo01Normalization", "rgb_to_0_1": "RGBTo01Normalization"}
# schemes that leave voxels outside the mask at zero, so they may normalise inside the nonzero mask only
MASKABLE_SCHEMES = {"ZScoreNormalization"}
SCHEMES = ("CTNormalization", "ZScoreNormalization", "NoNormalization", "RescaleTo01Normalization",
           "RGBTo01Normalization")


def scheme_for_channel(name: str) -> str:
    return SCHEME_FOR_CHANNEL_NAME.get(name.strip().lower(), "ZScoreNormalization")


def normalize_channel(image: np.ndarray, seg: np.ndarray | None, scheme: str, use_mask: bool,
                      intensity_properties: dict | None = None) -> np.ndarray:
    """Normalise one (z, y, x) channel in float32; `seg` is the cropped label map (-1 outside the mask)."""
    image = image.astype(np.float32, copy=False)
    if scheme == "ZScoreNormalization":
        if use_mask:
            if seg is None:
                raise ValueError("ZScoreNormalization inside the nonzero mask needs the cropped label map")
            mask = seg >= 0
            values = image[mask]
            mean, std = values.mean(), values.std()
            image[mask] = (values - mean) / max(std, 1e-8)
        else:
            mean, std = image.mean(), image.std()
            image -= mean
            image /= max(std, 1e-8)
    elif scheme == "CTNormalization":
        if not intensity_properties:
            raise ValueError("CTNormalization needs the dataset's foreground intensity properties (run plan)")
        p = intensity_properties
        np.clip(image, p["percentile_00_5"], p["percentile_99_5"], out=image)
        image -= p["mean"]
        image /= max(p["std"], 1e-8)
    elif scheme == "RescaleTo01Normalization":
        image -= image.min()
        image /= np.clip(image.max(), a_min=1e-8, a_max=None)
    elif scheme == "RGBTo01Normalization":
        image /= 255.0
    elif scheme != "NoNormalization":
        raise ValueError(f"unknown normalisation scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    return image


def normalize(data: np.ndarray, seg: np.ndarray | None, schemes, use_mask, intensity_properties) -> np.ndarray:
    """Normalise every channel of (c, z, y, x) data in place (float32)."""
    data = data.astype(np.float32, copy=False)
    for c in range(data.shape[0]):
        props = intensity_properties.get(str(c)) if intensity_properties else None
        data[c] = normalize_channel(data[c], None if seg is None else seg[0], schemes[c], use_mask[c], props)
    return data
