"""The user-facing settings as each front end shows them, all derived from the config dataclasses.

One place (a field declared with :func:`musetalk.config.option`) says a setting's name, type, default, choices
and help; from it come the CLI flags (``--bbox-shift``), the server's form fields (``bbox_shift``) and the batch
columns (``bbox_shift``). A new config field appears in all three without touching them.
"""

from __future__ import annotations

import argparse
import inspect
from typing import Any, Optional

from musetalk.config import GenerationConfig, Setting, user_settings

# Transport-level bounds on integer form fields: far outside any useful value, they only stop numbers that
# would overflow the int32 arithmetic of the crop code. The useful ranges are checked by GenerationConfig.
FORM_INT_BOUND = 4096


def settings_for(*scopes: str) -> list[Setting]:
    """The user settings whose scope is one of ``scopes`` (``run``, ``batch``, ``process``)."""
    return [s for s in user_settings() if s.scope in scopes]


def _describe(setting: Setting) -> str:
    choices = f" ({' | '.join(setting.choices)})" if setting.choices else ""
    return f"{setting.help}{choices} (default: {setting.default}, or the version's preset)"


# -- CLI ----------------------------------------------------------------------------------------------------------
def add_setting_flags(parser: argparse.ArgumentParser, scopes: tuple[str, ...] = ("run", "batch", "process")) -> None:
    """One ``--flag`` per setting of ``scopes``; unset flags stay None so the version's preset decides."""
    for setting in settings_for(*scopes):
        kwargs: dict[str, Any] = {"dest": setting.name, "default": None,
                                  "help": f"{setting.help} (default: {setting.default}, or the version's preset)"}
        if setting.choices:
            kwargs["choices"] = setting.choices
        if setting.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = setting.type
            kwargs["metavar"] = setting.type.__name__.upper() if not setting.choices else None
        parser.add_argument(setting.flag, **kwargs)


def add_models_flag(parser: argparse.ArgumentParser) -> None:
    """``--models DIR``: the weights folder (every command that loads the models)."""
    from pathlib import Path

    parser.add_argument("--models", type=Path, default=None,
                        help="models folder (default: $MUSETALK_MODELS or ./models)")


def config_from_args(namespace: argparse.Namespace | dict[str, Any]) -> GenerationConfig:
    """The version's preset with every setting given on the command line (or in a form) applied."""
    from musetalk.config import preset

    settings = overrides_from(namespace)
    return preset(settings.pop("version", "v15"), **settings)


def overrides_from(namespace: argparse.Namespace | dict[str, Any]) -> dict[str, Any]:
    """The settings given (not None) in a parsed namespace or a dict of form fields, by field name."""
    values = vars(namespace) if isinstance(namespace, argparse.Namespace) else namespace
    names = {s.name for s in user_settings()}
    return {k: v for k, v in values.items() if k in names and v is not None}


# -- server -------------------------------------------------------------------------------------------------------
def form_parameters(scopes: tuple[str, ...] = ("run", "batch")) -> list[inspect.Parameter]:
    """FastAPI ``Form`` parameters (keyword-only, optional) for the settings of ``scopes``."""
    from fastapi import Form

    params = []
    for setting in settings_for(*scopes):
        bounds: dict[str, Any] = {"ge": -FORM_INT_BOUND, "le": FORM_INT_BOUND} if setting.type is int else {}
        params.append(inspect.Parameter(setting.name, inspect.Parameter.KEYWORD_ONLY,
                                        default=Form(None, description=_describe(setting), **bounds),
                                        annotation=Optional[setting.type]))  # noqa: UP045 (evaluated by FastAPI)
    return params


def with_form_settings(endpoint: Any, scopes: tuple[str, ...] = ("run", "batch")) -> Any:
    """``endpoint`` (which takes ``**settings``) with a signature FastAPI reads: its own parameters + the forms."""
    own = [p for p in inspect.signature(endpoint).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    endpoint.__signature__ = inspect.Signature([*own, *form_parameters(scopes)])
    return endpoint


# -- batch --------------------------------------------------------------------------------------------------------
def row_settings() -> dict[str, type]:
    """Batch columns a row may set: every per-run setting, by name, with its type."""
    return {s.name: s.type for s in settings_for("run")}


def batch_wide_settings() -> list[Setting]:
    """Settings set once for a whole batch (the models are loaded once): a row may not change them."""
    return settings_for("batch", "process")
