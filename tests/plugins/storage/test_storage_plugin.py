"""The plugin wiring: the [storage] section, the transport hook, secrets kept out of dumps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from covenant.engine.session import open_session
from covenant.plugins.storage import plugin as storage_plugin
from covenant.plugins.storage.config import StorageConfig, resolve_credentials
from covenant.plugins.storage.transport import LocalTransport, S3Transport


def session(tmp_path: Path, *overrides: str, environ: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    env = {"COVENANT_PLUGINS": "", **(environ or {})}
    return open_session(
        None,
        [f"run.root={json.dumps(str(tmp_path / 'runs'))}", *overrides],
        environ=env,
        extra_plugins=[("storage", storage_plugin)],
    )


def test_defaults_match_the_spec(tmp_path: Path) -> None:
    cfg = session(tmp_path).config.section("storage")
    assert isinstance(cfg, StorageConfig)
    assert (cfg.url, cfg.upload_grace_s, cfg.retention_windows, cfg.retries) == ("", 70, 100, 3)
    assert (cfg.range_chunk_bytes, cfg.max_parallel_ranges, cfg.single_get_max_bytes) == (
        64 << 20,
        8,
        1 << 30,
    )


def test_transport_hook_by_scheme(tmp_path: Path) -> None:
    s = session(tmp_path)
    t = s.hook.covenant_transport(url="", config=s.config)
    assert isinstance(t, LocalTransport)
    assert t.root == str((tmp_path / "runs" / "local" / "storage").resolve())
    assert (
        s.hook.covenant_transport(url="memory://hook-test", config=s.config).url
        == "memory://hook-test"
    )
    assert s.hook.covenant_transport(url="gopher://x", config=s.config) is None
    assert storage_plugin.storage_url(s.config).startswith("file://")


def test_s3_transport_from_config(tmp_path: Path) -> None:
    s = session(tmp_path, "storage.endpoint_url=http://127.0.0.1:9", "storage.r2=true")
    t = s.hook.covenant_transport(url="s3://bucket/prefix", config=s.config)
    assert isinstance(t, S3Transport) and t.root == "bucket/prefix"


def test_secrets_stay_out_of_the_resolved_dump(tmp_path: Path) -> None:
    s = session(
        tmp_path,
        environ={
            "COVENANT__STORAGE__SECRET_ACCESS_KEY": "hunter2",
            "COVENANT__STORAGE__ACCESS_KEY_ID": "AKIA",
        },
    )
    path = s.write_resolved()
    text = path.read_text()
    assert "hunter2" not in text and "**" in text
    creds = resolve_credentials(s.config.section("storage"), {})
    assert creds is not None and creds.secret == "hunter2" and "hunter2" not in repr(creds)


def test_credentials_from_environment() -> None:
    cfg = StorageConfig()
    assert resolve_credentials(cfg, {}) is None
    creds = resolve_credentials(cfg, {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"})
    assert creds is not None and (creds.key_id, creds.secret) == ("a", "b")
    creds = resolve_credentials(
        cfg,
        {
            "COVENANT_S3_KEY": "c",
            "COVENANT_S3_SECRET": "d",
            "AWS_ACCESS_KEY_ID": "a",
            "AWS_SECRET_ACCESS_KEY": "b",
        },
    )
    assert creds is not None and (creds.key_id, creds.secret) == ("c", "d")


def test_typos_are_config_errors(tmp_path: Path) -> None:
    from covenant.engine.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown key"):
        session(tmp_path, "storage.retires=3")
