"""The routing YAML: path-precise errors, ${VAR} interpolation, secrets, and ``interlock check``."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import SecretStr

from backends.openai import OpenAIConfig
from gateway.cli import main
from gateway.config import ConfigError, _parse_yaml, interpolate, load_config, parse_config

URL = "http://127.0.0.1:8000/v1"
SECRET = "sk-from-env-9f8e7d6c5b4a"


def base(**models: Any) -> dict[str, Any]:
    return {
        "backends": {"up": {"kind": "openai", "base_url": URL}, "down": {"kind": "openai", "base_url": URL}},
        "models": models or {"chat": {"targets": ["up"]}},
    }


def problems(data: Any, env: dict[str, str] | None = None) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, "<test>", env={} if env is None else env)
    return caught.value.problems


def write(tmp_path: Path, text: str, name: str = "routing.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def check(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``interlock check PATH``: exit code, stdout, stderr."""
    with pytest.raises(SystemExit) as caught:
        main(["check", str(path)])
    out, err = capsys.readouterr()
    code = caught.value.code
    assert isinstance(code, int)
    return code, out, err


# --- paths in errors ------------------------------------------------------------------


def test_unknown_backend_has_its_path() -> None:
    assert problems(base(chat={"targets": ["up", "down", "gpu"]})) == [
        ("models.chat.targets[2]", "unknown backend 'gpu'"),
    ]


def test_every_problem_is_reported_at_once() -> None:
    data = base(chat={"targets": ["gpu"], "fallback": ["up", "tpu"]}, other={"targets": ["npu"]})
    data["backends"]["up"]["base_url"] = "ftp://nowhere"
    assert problems(data) == [
        ("backends.up.base_url", "must be an http:// or https:// URL"),
        ("models.chat.targets[0]", "unknown backend 'gpu'"),
        ("models.chat.fallback[1]", "unknown backend 'tpu'"),
        ("models.other.targets[0]", "unknown backend 'npu'"),
    ]


def test_unknown_kind() -> None:
    data = base()
    data["backends"]["up"]["kind"] = "gpu"
    known = "known: llamacpp, ollama, openai, vllm"
    assert problems(data) == [("backends.up.kind", f"unknown backend kind 'gpu'; {known}")]
    del data["backends"]["up"]["kind"]
    assert problems(data) == [("backends.up.kind", f"unknown backend kind None; {known}")]


def test_unknown_policy() -> None:
    [(path, message)] = problems(base(chat={"targets": ["up"], "policy": "random"}))
    assert path == "models.chat.policy"
    assert message == (
        "unknown policy 'random'; known: ordered, weighted, least_busy, cost, latency, balanced, slo"
    )


def test_duplicate_target() -> None:
    assert problems(base(chat={"targets": ["up", "down", "up"]})) == [
        ("models.chat.targets[2]", "backend 'up' is listed twice"),
    ]


def test_target_repeated_in_fallback() -> None:
    assert problems(base(chat={"targets": ["up"], "fallback": ["down", "up"]})) == [
        ("models.chat.fallback[1]", "backend 'up' is listed twice"),
    ]


@pytest.mark.parametrize("url", ["ftp://host/v1", "127.0.0.1:8000/v1", "http://", "", "localhost"])
def test_bad_base_url(url: str) -> None:
    data = base()
    data["backends"]["up"]["base_url"] = url
    assert problems(data) == [("backends.up.base_url", "must be an http:// or https:// URL")]


def test_base_url_trailing_slash_is_dropped() -> None:
    data = base()
    data["backends"]["up"]["base_url"] = URL + "/"
    assert parse_config(data, env={}).backends["up"].base_url == URL  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d.update(modles={}), ("modles", "Extra inputs are not permitted")),
        (
            lambda d: d["backends"]["up"].update({"base-url": URL}),
            ("backends.up.base-url", "Extra inputs are not permitted"),
        ),
        (
            lambda d: d["backends"]["up"].update(timeouts={"first_token": 0}),
            ("backends.up.timeouts.first_token", "Input should be greater than 0"),
        ),
        (
            lambda d: d["models"].update(chat={"targets": []}),
            ("models.chat.targets", "List should have at least 1 item after validation, not 0"),
        ),
        (
            lambda d: d["models"].update({"bad name": {"targets": ["up"]}}),
            ("models.bad name", "model names use letters, digits and . _ : / - only"),
        ),
        (
            lambda d: d.update(auth={"keys": [{"name": "k", "sha256": "abc"}]}),
            ("auth.keys[0].sha256", "String should match pattern '^[0-9a-fA-F]{64}$'"),
        ),
        (
            lambda d: d.update(auth={"keys": [{"name": "k", "sha256": "a" * 64, "models": ["chat", "gpt"]}]}),
            ("auth.keys[0].models[1]", "unknown model 'gpt'"),
        ),
    ],
)
def test_other_problems_have_paths(mutate: Any, expected: tuple[str, str]) -> None:
    data = base()
    mutate(data)
    assert expected in problems(data)


def test_duplicate_key_name() -> None:
    keys = [{"name": "team", "sha256": "a" * 64}, {"name": "team", "sha256": "b" * 64}]
    assert problems({**base(), "auth": {"keys": keys}}) == [
        ("auth.keys[1].name", "key name 'team' is used twice"),
    ]


@pytest.mark.parametrize("data", [None, [], "backends: {}", 3])
def test_not_a_mapping(data: Any) -> None:
    assert problems(data) == [("", "the routing file must be a mapping with backends: and models:")]


# --- ${VAR} interpolation ----------------------------------------------------------------


def test_interpolation_forms() -> None:
    env = {"HOST": "gpu-1", "PORT": "9000", "EMPTY": ""}
    doc = {
        "a": "http://${HOST}:${PORT}/v1",
        "b": "${MISSING:-fallback}",
        "c": "${HOST:-unused}",
        "d": "cost $$5 and $${HOST}",
        "e": ["${EMPTY}", "${EMPTY:-dflt}", "${MISSING:-}"],
        "f": {"nested": "${PORT}"},
        "g": 42,
        "h": "a $ alone and ${not valid}",
    }
    value, found = interpolate(doc, env)
    assert found == []
    assert value == {
        "a": "http://gpu-1:9000/v1",
        "b": "fallback",
        "c": "gpu-1",
        "d": "cost $5 and ${HOST}",
        "e": ["", "dflt", ""],
        "f": {"nested": "9000"},
        "g": 42,
        "h": "a $ alone and ${not valid}",
    }


def test_missing_variable_is_reported_with_its_path() -> None:
    data = base()
    data["backends"]["down"]["api_key"] = "${OPENAI_KEY}"
    data["backends"]["down"]["headers"] = {"x-team": "${TEAM}"}
    assert problems(data) == [
        ("backends.down.api_key", "environment variable OPENAI_KEY is not set"),
        ("backends.down.headers.x-team", "environment variable TEAM is not set"),
    ]


def test_missing_variable_in_a_list_has_its_index() -> None:
    assert ("models.chat.targets[1]", "environment variable SECOND is not set") in problems(
        base(chat={"targets": ["up", "${SECOND}"]})
    )


def test_interpolated_values_are_typed_by_the_schema() -> None:
    data = base()
    data["backends"]["up"]["base_url"] = "${URL:-http://fallback:1/v1}"
    data["backends"]["up"]["timeouts"] = {"first_token": "${FIRST:-2.5}"}
    config = parse_config(data, env={})
    up = config.backends["up"]
    assert isinstance(up, OpenAIConfig)
    assert up.base_url == "http://fallback:1/v1"
    assert up.timeouts.first_token == 2.5


def test_os_environ_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTERLOCK_TEST_URL", "http://from-env:7/v1")
    data = base()
    data["backends"]["up"]["base_url"] = "${INTERLOCK_TEST_URL}"
    assert parse_config(data).backends["up"].base_url == "http://from-env:7/v1"  # type: ignore[attr-defined]


# --- secrets ------------------------------------------------------------------------------


def test_api_key_from_env_never_in_repr(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        backends:
          hosted:
            kind: openai
            base_url: https://api.example.com/v1
            api_key: ${HOSTED_KEY}
        models:
          chat: {targets: [hosted]}
    """,
    )
    config = load_config(path, env={"HOSTED_KEY": SECRET})
    hosted = config.backends["hosted"]
    assert isinstance(hosted, OpenAIConfig)
    assert isinstance(hosted.api_key, SecretStr)
    assert hosted.api_key.get_secret_value() == SECRET
    for shown in (
        repr(config),
        str(config),
        repr(hosted),
        str(hosted),
        hosted.model_dump_json(),
        repr(hosted.model_dump()),
    ):
        assert SECRET not in shown


def test_api_key_not_in_config_errors(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        backends:
          hosted: {kind: openai, base_url: "ftp://x", api_key: "${HOSTED_KEY}", surprise: 1}
        models:
          chat: {targets: [hosted, nope]}
    """,
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={"HOSTED_KEY": SECRET})
    assert len(caught.value.problems) == 3
    assert SECRET not in str(caught.value)


# --- YAML and files ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("backends:\n  up: {kind: openai\nmodels: {}\n", "line 3, column 7"),
        ("backends:\n  up:\n    kind: openai\n   base_url: x\n", "line 4, column 4"),
        ("backends: {}\n\tmodels: {}\n", "line 2, column 1"),
    ],
)
def test_invalid_yaml_reports_line_and_column(tmp_path: Path, text: str, where: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    [(path_, message)] = caught.value.problems
    assert path_ == where
    # libyaml (which parses valid files) words errors otherwise: the message is PyYAML's own
    with pytest.raises(yaml.MarkedYAMLError) as pure:
        yaml.safe_load(text)
    assert message == f"not valid YAML: {pure.value.problem}"


def test_the_fast_yaml_parser_builds_the_same_document(tmp_path: Path) -> None:
    """Valid files are parsed by libyaml where PyYAML has it (a reload under load holds the GIL
    8x less long): the document is what the pure-Python safe loader builds, tags and all."""
    assert yaml.__with_libyaml__, "this environment's PyYAML should be built with libyaml"
    example = (Path(__file__).parent.parent / "config.example.yaml").read_text()
    tricky = textwrap.dedent(
        """\
        a: &anchor {x: 1, y: [yes, no, ~, 0o17, 0x1f, 1e3, .inf, 2026-01-02]}
        b: *anchor
        c: "esc\\t\\u00e9"
        d: |
          two
          lines
        ? explicit key
        : value
        e: !!str 12
        """
    )
    for text in (example, tricky, "a: 1\r\nb: 2\r\n"):
        assert _parse_yaml(text) == yaml.safe_load(text)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "absent.yaml", env={})
    assert caught.value.problems == [("", "cannot read the file: No such file or directory")]


# --- interlock check ----------------------------------------------------------------------------


def test_check_valid_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHECK_KEY", SECRET)
    path = write(
        tmp_path,
        """
        auth:
          keys:
            - {name: team-a, sha256: "%s", models: [chat]}
        backends:
          up: {kind: openai, base_url: "${UP_URL:-http://127.0.0.1:8000/v1}", api_key: "${CHECK_KEY}"}
          down: {kind: openai, base_url: "http://127.0.0.1:8001/v1"}
        models:
          chat: {targets: [up], fallback: [down]}
          raw: {targets: [down]}
    """
        % ("0" * 64),
    )
    code, out, err = check(path, capsys)
    assert code == 0, err
    assert out == f"{path}: ok (2 backend(s), models: chat, raw)\n"
    assert err == ""
    assert SECRET not in out


def test_check_reports_paths_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GPU_URL", raising=False)
    path = write(
        tmp_path,
        """
        backends:
          a: {kind: openai, base_url: "http://127.0.0.1:8000/v1"}
          b: {kind: openai, base_url: "${GPU_URL}"}
          c: {kind: tpu}
        models:
          chat: {targets: [a, b, gpu], policy: ordered}
    """,
    )
    code, out, err = check(path, capsys)
    assert code == 1
    assert out == ""
    lines = err.splitlines()
    assert "models.chat.targets[2]: unknown backend 'gpu'" in lines
    assert "backends.b.base_url: environment variable GPU_URL is not set" in lines
    assert "backends.c.kind: unknown backend kind 'tpu'; known: llamacpp, ollama, openai, vllm" in lines
    assert lines[-1] == f"{path}: {len(lines) - 1} problem(s)"


def test_check_invalid_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "backends:\n  up: {kind: openai\nmodels: {}\n")
    code, out, err = check(path, capsys)
    assert code == 1
    assert out == ""
    assert err.splitlines()[0].startswith("line 3, column 7: not valid YAML: ")
    assert err.splitlines()[-1] == f"{path}: 1 problem(s)"


def test_check_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = check(tmp_path / "nope.yaml", capsys)
    assert code == 1
    assert "cannot read the file" in err


def test_example_config_checks(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped example is valid as written, with none of its variables set."""
    monkeypatch.delenv("VLLM_URL", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    path = Path(__file__).parent.parent / "config.example.yaml"
    code, out, err = check(path, capsys)
    assert code == 0, err
    assert out.startswith(f"{path}: ok (")


# --- one pass over everything, and the files it names ---------------------------------------


def test_shape_route_and_backend_errors_come_together() -> None:
    data = base(chat={"targets": ["up", "gpu"], "policy": "random"}, other={"targets": "up"})
    data["backends"]["down"]["base_url"] = "ftp://x"
    data["modles"] = {}
    found = problems(data)
    assert found[:2] == [
        ("modles", "Extra inputs are not permitted"),
        ("backends.down.base_url", "must be an http:// or https:// URL"),
    ]
    assert [path for path, _ in found[2:]] == [
        "models.chat.policy",
        "models.chat.targets[1]",
        "models.other.targets",
    ]


def gguf_doc(tmp_path: Path) -> dict[str, Any]:
    (tmp_path / "model.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    (tmp_path / "notes.gguf").write_text("not a model")
    paths = {"good": "model.gguf", "absent": "absent.gguf", "text": "notes.gguf", "folder": "."}
    return {
        "backends": {
            name: {"kind": "llamacpp", "model_path": str(tmp_path / file)} for name, file in paths.items()
        },
        "models": {"chat": {"targets": list(paths)}},
    }


def test_model_files_are_checked_with_their_paths(tmp_path: Path) -> None:
    path = tmp_path / "routing.yaml"
    path.write_text(yaml.safe_dump(gguf_doc(tmp_path), sort_keys=False))
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert caught.value.problems == [
        ("backends.absent.model_path", f"cannot read {tmp_path / 'absent.gguf'}: No such file or directory"),
        ("backends.text.model_path", f"{tmp_path / 'notes.gguf'} is not a GGUF file (no GGUF magic)"),
        ("backends.folder.model_path", f"cannot read {tmp_path}: Is a directory"),
    ]
    # an in-memory config (tests) names files only to be loaded later: only its shape is checked
    assert set(parse_config(gguf_doc(tmp_path), env={}).backends) == {"good", "absent", "text", "folder"}


def test_check_prints_every_problem_in_one_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(
        tmp_path,
        f"""
        extra: 1
        backends:
          local: {{kind: llamacpp, model_path: "{tmp_path / "gone.gguf"}", parallel: 0}}
          up: {{kind: openai, base_url: "ftp://x"}}
          fine: {{kind: llamacpp, model_path: "{tmp_path / "missing.gguf"}"}}
        models:
          chat: {{targets: [local, up, gpu], policy: random}}
    """,
    )
    code, out, err = check(path, capsys)
    assert (code, out) == (1, "")
    assert err.splitlines() == [
        "extra: Extra inputs are not permitted",
        "backends.local.parallel: Input should be greater than or equal to 1",
        "backends.up.base_url: must be an http:// or https:// URL",
        f"backends.fine.model_path: cannot read {tmp_path / 'missing.gguf'}: No such file or directory",
        "models.chat.policy: unknown policy 'random'; known: ordered, weighted, least_busy, cost, latency, "
        "balanced, slo",
        "models.chat.targets[2]: unknown backend 'gpu'",
        f"{path}: 6 problem(s)",
    ]
