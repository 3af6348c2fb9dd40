"""The model plugin's hooks: sections, the provider, the commands."""

from __future__ import annotations

from typing import Any

from covenant.engine.protocols import ModelRuntime
from covenant.models import plugin
from covenant.models.config import ModelConfig, OptimConfig


class FakeConfig:
    def __init__(self, sections: dict[str, Any]) -> None:
        self.sections = sections

    def has(self, name: str) -> bool:
        return name in self.sections

    def section(self, name: str) -> Any:
        return self.sections[name]


def test_registers_sections_and_commands() -> None:
    sections: dict[str, Any] = {}
    plugin.covenant_add_config_sections(register=sections.__setitem__)
    assert sections == {"model": ModelConfig, "optim": OptimConfig}
    commands: dict[str, Any] = {}
    plugin.covenant_register_commands(register=commands.__setitem__)
    assert set(commands) == {"model-info", "export"} and all(map(callable, commands.values()))


def test_build_model_only_when_the_section_is_there(tiny_model_kwargs: dict[str, Any]) -> None:
    assert plugin.covenant_build_model(config=FakeConfig({})) is None
    rt = plugin.covenant_build_model(
        config=FakeConfig({"model": ModelConfig(**tiny_model_kwargs), "optim": OptimConfig()})
    )
    assert isinstance(rt, ModelRuntime)
    assert rt.parallel.world_size == 1 and rt.seq_len == 128 and rt.micro_batch == 1
