"""Config loading: precedence, typed validation, clear errors naming file, key and expectation."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, Field

from covenant.engine.config import (
    build_config,
    parse_value,
    read_toml,
    resolve_config_path,
    write_resolved,
)
from covenant.engine.errors import ConfigError


class Demo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lr: float = 1e-3
    steps: int = Field(10, ge=1)
    name: str = "x"


SCHEMA = {"demo": Demo}


def test_defaults_file_env_set_precedence() -> None:
    file = {"demo": {"lr": 0.1, "steps": 5, "name": "file"}}
    env = {"COVENANT__DEMO__STEPS": "7", "COVENANT__DEMO__NAME": "env"}
    cfg = build_config(SCHEMA, file, source="f.toml", overrides=["demo.name=cli"], environ=env)
    demo = cfg.section("demo")
    assert demo.lr == 0.1  # file beats default
    assert demo.steps == 7  # env beats file
    assert demo.name == "cli"  # --set beats env
    assert cfg.origins["demo.name"] == "--set demo.name"
    assert cfg.origins["demo.steps"] == "$COVENANT__DEMO__STEPS"


def test_missing_sections_take_defaults() -> None:
    cfg = build_config(SCHEMA, {}, environ={})
    assert cfg.section("demo") == Demo()
    assert cfg.demo.steps == 10


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"demo": {"lr": "fast"}}, "f.toml: [demo] lr: Input should be a valid number"),
        ({"demo": {"stepz": 3}}, "f.toml: [demo] stepz: unknown key"),
        (
            {"demo": {"steps": 0}},
            "f.toml: [demo] steps: Input should be greater than or equal to 1",
        ),
        ({"nope": {"a": 1}}, "f.toml: unknown section [nope]"),
        ({"demo": 3}, "f.toml: 'demo' must be a [section]"),
    ],
)
def test_bad_values_name_file_key_and_expectation(data: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(SCHEMA, data, source="f.toml", environ={})
    assert needle in str(info.value)


def test_bad_set_and_env_name_their_origin() -> None:
    with pytest.raises(ConfigError, match=r"--set demo.steps: \[demo\] steps"):
        build_config(SCHEMA, {}, overrides=["demo.steps=abc"], environ={})
    with pytest.raises(ConfigError, match=r"\$COVENANT__DEMO__LR: \[demo\] lr"):
        build_config(SCHEMA, {}, environ={"COVENANT__DEMO__LR": "[1]"})
    with pytest.raises(ConfigError, match=r"expected section\.key=value"):
        build_config(SCHEMA, {}, overrides=["nosection"], environ={})


def test_parse_value_is_toml_with_string_fallback() -> None:
    assert parse_value("3e-4") == pytest.approx(3e-4)
    assert parse_value("true") is True
    assert parse_value("[1, 2]") == [1, 2]
    assert parse_value("hello world") == "hello world"


def test_malformed_and_missing_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[demo\nlr = 1\n")
    with pytest.raises(ConfigError, match=r"bad.toml: malformed TOML"):
        read_toml(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        resolve_config_path(tmp_path / "missing.toml")


def test_builtin_configs_resolve_by_name() -> None:
    assert resolve_config_path("tiny").name == "tiny.toml"
    assert resolve_config_path("validator.toml").name == "validator.toml"


def test_resolved_dump_has_versions(tmp_path: Path) -> None:
    cfg = build_config(SCHEMA, {"demo": {"lr": 0.5}}, source="f.toml", environ={})
    path = write_resolved(cfg, tmp_path / "run", {"core": "covenant 0.1.0"})
    text = path.read_text()
    assert '"lr": 0.5' in text and '"core": "covenant 0.1.0"' in text
    assert not list((tmp_path / "run").glob("*.tmp"))
