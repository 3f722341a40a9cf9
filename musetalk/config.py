"""Typed settings, one frozen dataclass per concern, and the v1 / v1.5 presets.

The CLI flags, the server's form fields and the notebooks all build these same objects, so the front ends
cannot drift. Architecture hyper-parameters are *not* here: they live in the checkpoints' own JSON files.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from musetalk.errors import InputError

VERSIONS = ("v15", "v1")
PARSING_MODES = ("raw", "jaw", "neck")


@dataclass(frozen=True)
class CropConfig:
    """Where the face crop sits."""

    bbox_shift: int = 0  # px; moves the upper edge of the crop (positive: down, more mouth opening)
    extra_margin: int = 10  # px added below the chin (v1.5); 0 for v1
    landmarks: str = "dlib"  # landmark backend: dlib | face_alignment | dwpose


@dataclass(frozen=True)
class BlendConfig:
    """How the generated face is pasted back."""

    parsing_mode: str = "jaw"  # raw | jaw | neck: which face-parsing classes form the paste mask
    left_cheek_width: int = 90  # px (in the 512 parsing space) kept from the source on the left in jaw mode
    right_cheek_width: int = 90  # same, right side
    expand: float = 1.5  # the parsed square is this much larger than the face box
    upper_boundary_ratio: float = 0.5  # top fraction of the mask cleared (the upper face is kept)
    blur_factor: float = 0.05  # mask edge blur, fraction of the crop width: 0.05 as inference.py (realtime: 0.1)


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how the models run."""

    device: str = "auto"  # auto (cuda > mps > cpu) | cpu | cuda | mps
    dtype: str = "auto"  # auto | fp32 | fp16 | bf16
    batch_size: int = 8  # frames per UNet + VAE call


@dataclass(frozen=True)
class GenerationConfig:
    """Everything one generation run needs besides the inputs and the weights."""

    version: str = "v15"  # v15 | v1: picks the UNet file and the preset below
    fps: float = 25.0  # output frame rate for image / folder sources (videos keep their own)
    crop: CropConfig = field(default_factory=CropConfig)
    blend: BlendConfig = field(default_factory=BlendConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def validate(self) -> "GenerationConfig":
        """Raise InputError with the fix for any out-of-range value; returns self."""
        if self.version not in VERSIONS:
            raise InputError(f"unknown version {self.version!r}", f"use one of {', '.join(VERSIONS)}")
        if self.blend.parsing_mode not in PARSING_MODES:
            raise InputError(f"unknown parsing mode {self.blend.parsing_mode!r}", f"use one of {', '.join(PARSING_MODES)}")
        if not 1 <= self.fps <= 120:
            raise InputError(f"fps {self.fps} is out of range", "use an fps between 1 and 120")
        if self.runtime.batch_size < 1:
            raise InputError("batch size must be at least 1", "use --batch-size 1 or more")
        if self.crop.extra_margin < 0:
            raise InputError("extra_margin must be >= 0", "use 0 (v1) or about 10 (v1.5)")
        for name in ("left_cheek_width", "right_cheek_width"):
            if not 0 <= getattr(self.blend, name) <= 256:
                raise InputError(f"{name} must be within 0..256", "the default is 90 (v1.5) or 80 (v1)")
        return self


def preset(version: str = "v15", **overrides: object) -> GenerationConfig:
    """The reference settings of a version: v1.5 (extra margin 10, jaw mode, cheeks 90) or v1 (raw mode, cheeks 80).

    ``overrides`` may name any field of GenerationConfig or of its parts (bbox_shift=5, batch_size=4, ...).
    """
    if version == "v1":
        config = GenerationConfig(version="v1", crop=CropConfig(extra_margin=0),
                                  blend=BlendConfig(parsing_mode="raw", left_cheek_width=80, right_cheek_width=80))
    elif version == "v15":
        config = GenerationConfig(version="v15")
    else:
        raise InputError(f"unknown version {version!r}", f"use one of {', '.join(VERSIONS)}")
    return with_overrides(config, **overrides)


def with_overrides(config: GenerationConfig, **overrides: object) -> GenerationConfig:
    """A copy with fields replaced by name, wherever they live; None values are ignored; unknown names raise."""
    parts = {"crop": config.crop, "blend": config.blend, "runtime": config.runtime}
    top: dict[str, object] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        owner = next((name for name, part in parts.items() if key in part.__dataclass_fields__), None)
        if owner is not None:
            parts[owner] = replace(parts[owner], **{key: value})
        elif key in GenerationConfig.__dataclass_fields__:
            top[key] = value
        else:
            raise InputError(f"unknown setting {key!r}", "see `musetalk generate --help` for the settings")
    return replace(config, **parts, **top).validate()
