"""One definition per option: CLI flags, server form fields, `serve` flags and batch columns come from the dataclasses."""

from __future__ import annotations

import argparse
import dataclasses

import pytest


def parse(args: list[str]) -> argparse.Namespace:
    from musetalk.frontends.cli import build_parser

    return build_parser().parse_args(["generate", "--source", "s.png", "--audio", "a.wav", "--output", "o.mp4", *args])


def test_every_user_setting_is_a_generate_flag_with_its_type() -> None:
    from musetalk.config import user_settings
    from musetalk.frontends.cli import _config

    names = {s.name for s in user_settings()}
    ns = parse([])
    assert names <= set(vars(ns)) and all(getattr(ns, n) is None for n in names)  # unset: the preset decides
    assert _config(ns) == _config(parse(["--version", "v15"]))
    config = _config(parse(["--bbox-shift", "-7", "--parsing-mode", "neck", "--blur-factor", "0.1", "--version", "v1",
                            "--batch-size", "3", "--dtype", "fp32"]))
    assert (config.crop.bbox_shift, config.blend.parsing_mode, config.blend.blur_factor) == (-7, "neck", 0.1)
    assert (config.version, config.runtime.batch_size, config.runtime.dtype) == ("v1", 3, "fp32")
    assert config.blend.left_cheek_width == 80  # the v1 preset still applies where no flag was given
    with pytest.raises(SystemExit):
        parse(["--parsing-mode", "cheeks"])  # choices come from the config field


def test_a_new_config_field_appears_in_every_front_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """Declaring one option() field is all it takes: the flag, the form field and the batch column follow."""
    from musetalk import config as config_module
    from musetalk.frontends import options

    @dataclasses.dataclass(frozen=True)
    class Crop(config_module.CropConfig):
        wobble: int = config_module.option(3, "a new crop setting")

    monkeypatch.setitem(config_module._PARTS, "crop", Crop)
    assert "wobble" in {s.name for s in config_module.user_settings()}
    parser = argparse.ArgumentParser()
    options.add_setting_flags(parser)
    assert parser.parse_args(["--wobble", "5"]).wobble == 5
    assert options.row_settings()["wobble"] is int
    assert "wobble" in {p.name for p in options.form_parameters()}


def test_batch_columns_are_the_run_settings() -> None:
    from musetalk.frontends.batch.jobs import BATCH_WIDE, ROW_SETTINGS
    from musetalk.frontends.options import settings_for

    assert set(ROW_SETTINGS) == {s.name for s in settings_for("run")}
    assert {"version", "device", "dtype", "batch_size"} <= set(BATCH_WIDE)
    assert not set(ROW_SETTINGS) & set(BATCH_WIDE)


def test_serve_flags_come_from_server_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from musetalk.frontends.server import MiB, ServerSettings
    from musetalk.frontends.server.cli import _settings, add_serve_arguments

    monkeypatch.delenv("MUSETALK_SERVER_TOKEN", raising=False)
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    assert _settings(parser.parse_args([])) == ServerSettings()  # the defaults are the dataclass's, typed once
    flags = {a.dest for a in parser._actions}
    assert {f.name for f in dataclasses.fields(ServerSettings)} <= flags
    settings = _settings(parser.parse_args(["--max-upload-mb", "2", "--queue-size", "9", "--version", "v1",
                                            "--result-ttl", "5", "--max-source-frames", "10"]))
    assert settings.max_upload_bytes == 2 * MiB and isinstance(settings.max_upload_bytes, int)
    assert (settings.queue_size, settings.default_version, settings.result_ttl_s) == (9, "v1", 5.0)
    assert settings.max_source_frames == 10
    live = _settings(parser.parse_args(["--live-max-sessions", "2", "--live-max-chunk-mb", "1", "--max-avatars", "3",
                                        "--live-idle-timeout", "7.5"]))
    assert (live.live_max_sessions, live.live_max_chunk_bytes, live.max_avatars) == (2, MiB, 3)
    assert live.live_idle_timeout_s == 7.5
    from musetalk.errors import InputError

    with pytest.raises(InputError, match="--queue-size must be at least 1"):
        _settings(parser.parse_args(["--queue-size", "0"]))
    monkeypatch.setenv("MUSETALK_SERVER_TOKEN", "s3cret")
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    assert _settings(parser.parse_args([])).token == "s3cret"
