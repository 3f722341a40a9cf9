"""Typed settings, one frozen dataclass per concern, and the v1 / v1.5 presets.

The CLI flags, the server's form fields and the notebooks all build these same objects, so the front ends
cannot drift. Architecture hyper-parameters are *not* here: they live in the checkpoints' own JSON files.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any

from musetalk.errors import InputError

VERSIONS = ("v15", "v1")
PARSING_MODES = ("raw", "jaw", "neck")
SILENCE_MODES = ("off", "source", "closed")
SMOOTHING_MODES = ("off", "one_euro")


SCOPES = ("run", "batch", "process")


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None, scope: str = "run",
           user: bool = True) -> Any:
    """A config field that is also a user-facing setting: one place says its name, type, default and help.

    The CLI flags (``--bbox-shift``), the server's form fields and the batch columns (``bbox_shift``) are all
    derived from these fields (see :func:`user_settings` and ``musetalk.frontends.options``). ``scope`` says
    where a setting may change: ``run`` (every run: CLI flag, server form field, batch column), ``batch``
    (once per batch: CLI flag and server form field, not a batch column) or ``process`` (the models are built
    for it: a CLI flag only). ``user=False`` keeps a field out of the front ends.
    """
    assert scope in SCOPES, scope
    return field(default=default, metadata={"help": help, "choices": choices, "scope": scope, "user": user})


@dataclass(frozen=True)
class Setting:
    """One user-facing setting, as the front ends see it (derived from a config field)."""

    name: str  # field name: the server form field and batch column; the CLI flag is --name-with-dashes
    part: str  # which part of GenerationConfig holds it ("" for a top-level field)
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] | None
    scope: str  # run | batch | process (see option)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class CropConfig:
    """Where the face crop sits."""

    bbox_shift: int = option(0, "px; moves the upper edge of the crop (positive: down, more mouth opening)")
    extra_margin: int = option(10, "px added below the chin (v1.5); 0 for v1")
    landmarks: str = option("dlib", "landmark backend", choices=("dlib", "face_alignment", "dwpose"))
    # Temporal smoothing of the crop box over a video source (docs/quality.md); stored in the avatar.
    smoothing: str = option("off", "steadier crop box over a video: one_euro filters landmark jitter out; off "
                            "follows each frame's landmarks (the reference)", choices=SMOOTHING_MODES)
    smoothing_min_cutoff: float = option(0.5, "Hz; One-Euro cutoff at rest: lower = steadier still face, more lag")
    smoothing_beta: float = option(0.2, "One-Euro speed coefficient (per px/s): higher = less lag in fast moves")


@dataclass(frozen=True)
class BlendConfig:
    """How the generated face is pasted back."""

    parsing_mode: str = option("jaw", "which face-parsing classes form the paste mask", choices=PARSING_MODES)
    left_cheek_width: int = option(90, "px (in the 512 parsing space) kept from the source on the left in jaw mode")
    right_cheek_width: int = option(90, "same, right side")
    expand: float = option(1.5, "the parsed square is this much larger than the face box")
    upper_boundary_ratio: float = option(0.5, "top fraction of the mask cleared (the upper face is kept)")
    blur_factor: float = option(0.05, "mask edge blur, fraction of the crop width: 0.05 as inference.py (realtime: 0.1)")


@dataclass(frozen=True)
class SilenceConfig:
    """What the mouth does in pauses of the speech (musetalk/stages/silence.py, docs/quality.md)."""

    silence: str = option("source", "in pauses: source shows the source frame's own mouth, closed a closed-mouth "
                          "frame, off generates every frame (the reference)", choices=SILENCE_MODES)
    silence_threshold: float = option(0.5, "speech probability (0..1) below which audio counts as silence")
    silence_min_s: float = option(0.3, "s; shorter pauses keep the generated mouth")
    silence_frame: int = option(-1, "closed mode: source frame to show; -1 picks the most closed mouth")
    silence_fade: int = option(3, "frames of cross-fade at each edge of a pause")


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how the models run."""

    device: str = option("auto", "where the models run (auto: cuda > mps > cpu)", choices=("auto", "cpu", "cuda", "mps"),
                         scope="process")
    dtype: str = option("auto", "model dtype (auto: fp16 on GPUs, bf16 on CPUs with native bf16, else fp32)",
                        choices=("auto", "fp32", "fp16", "bf16"), scope="process")
    batch_size: int = option(8, "frames per UNet + VAE call", scope="batch")
    backend: str = option("auto", "UNet + VAE backend (auto: MLX on Apple Silicon when installed, else torch)",
                          choices=("auto", "torch", "mlx"), scope="process")


@dataclass(frozen=True)
class GenerationConfig:
    """Everything one generation run needs besides the inputs and the weights."""

    version: str = option("v15", "MuseTalk version: picks the UNet file and the preset", choices=VERSIONS, scope="batch")
    fps: float = option(25.0, "output frame rate for image / folder sources (videos keep their own)")
    crop: CropConfig = field(default_factory=CropConfig)
    blend: BlendConfig = field(default_factory=BlendConfig)
    pauses: SilenceConfig = field(default_factory=SilenceConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def validate(self) -> "GenerationConfig":
        """Raise InputError with the fix for any out-of-range value; returns self."""
        if self.version not in VERSIONS:
            raise InputError(f"unknown version {self.version!r}", f"use one of {', '.join(VERSIONS)}")
        if self.blend.parsing_mode not in PARSING_MODES:
            raise InputError(f"unknown parsing mode {self.blend.parsing_mode!r}", f"use one of {', '.join(PARSING_MODES)}")
        if not 1 <= self.fps <= 120:
            raise InputError(f"fps {self.fps} is out of range", "use an fps between 1 and 120")
        if self.runtime.backend not in ("auto", "torch", "mlx"):
            raise InputError(f"unknown backend {self.runtime.backend!r}", "use auto, torch or mlx")
        if self.runtime.batch_size < 1:
            raise InputError("batch size must be at least 1", "use --batch-size 1 or more")
        if self.crop.extra_margin < 0:
            raise InputError("extra_margin must be >= 0", "use 0 (v1) or about 10 (v1.5)")
        for name in ("left_cheek_width", "right_cheek_width"):
            if not 0 <= getattr(self.blend, name) <= 256:
                raise InputError(f"{name} must be within 0..256", "the default is 90 (v1.5) or 80 (v1)")
        self._validate_quiet()
        return self

    def _validate_quiet(self) -> None:
        crop, pauses = self.crop, self.pauses
        if crop.smoothing not in SMOOTHING_MODES:
            raise InputError(f"unknown smoothing {crop.smoothing!r}", f"use one of {', '.join(SMOOTHING_MODES)}")
        if not (crop.smoothing_min_cutoff > 0 and crop.smoothing_beta >= 0):
            raise InputError("smoothing_min_cutoff must be > 0 Hz and smoothing_beta >= 0",
                             "start from --smoothing-min-cutoff 0.5 --smoothing-beta 0.2")
        if pauses.silence not in SILENCE_MODES:
            raise InputError(f"unknown silence mode {pauses.silence!r}", f"use one of {', '.join(SILENCE_MODES)}")
        if not 0.0 < pauses.silence_threshold < 1.0:
            raise InputError(f"silence_threshold {pauses.silence_threshold} is outside (0, 1)", "0.5 is a good start")
        if not 0.0 <= pauses.silence_min_s <= 10.0:
            raise InputError(f"silence_min_s {pauses.silence_min_s} is outside 0..10 s", "about 0.3 s works well")
        if not 0 <= pauses.silence_fade <= 25:
            raise InputError(f"silence_fade {pauses.silence_fade} is outside 0..25 frames", "3 frames is 120 ms")


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
    parts: dict[str, Any] = {name: getattr(config, name) for name in _PARTS}
    top: dict[str, Any] = {}
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


_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def user_settings() -> list[Setting]:
    """Every user-facing setting of :class:`GenerationConfig` and its parts, in declaration order.

    Names are unique across the parts (:func:`with_overrides` relies on it), so one flat list serves the CLI,
    the server and the batch runner.
    """
    out: list[Setting] = []
    for part_name, cls in (("", GenerationConfig), *_PARTS.items()):
        for f in fields(cls):
            if f.name in _PARTS or not f.metadata.get("user", False):
                continue
            default = f.default if f.default is not MISSING else None
            typ = f.type if isinstance(f.type, type) else _TYPES[str(f.type)]
            out.append(Setting(f.name, part_name, typ, default, f.metadata["help"], f.metadata.get("choices"),
                               f.metadata.get("scope", "run")))
    return out


_PARTS: dict[str, type] = {"crop": CropConfig, "blend": BlendConfig, "pauses": SilenceConfig, "runtime": RuntimeConfig}
