"""Settings: read once from the environment, each bad variable named in a one-line error."""

import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from settings import DEFAULT_ACCESS_TOKEN, VARIABLES, Settings, SettingsError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_defaults():
    s = Settings.from_env({})
    assert s.port == 9081 and s.host == "0.0.0.0"
    assert s.access_tokens == (DEFAULT_ACCESS_TOKEN,) and s.default_token_in_use
    assert s.openai_base_url == "https://api.openai.com/v1"
    assert s.chat_completions_url == "https://api.openai.com/v1/chat/completions"
    assert s.default_model == "gpt-4o-mini" and dict(s.default_generate_params) == {}
    assert s.max_body_bytes == 32 * 1024 * 1024
    assert (s.connect_timeout, s.request_timeout, s.stream_idle_timeout, s.stream_keepalive) == (10, 600, 300, 15)
    assert s.max_concurrent_upstream == 1000
    assert (s.ws_max_message_bytes, s.ws_ping_interval) == (16 * 1024 * 1024, 20)


def test_realtime_settings():
    s = Settings.from_env({"WS_MAX_MESSAGE_BYTES": "65536", "WS_PING_INTERVAL": "0"})
    assert (s.ws_max_message_bytes, s.ws_ping_interval) == (65536, 0)  # 0: no pings


def test_access_tokens_comma_separated_and_legacy_name():
    assert Settings.from_env({"ACCESS_TOKEN": " a1 , b2,,"}).access_tokens == ("a1", "b2")
    assert Settings.from_env({"ACCESS_KEY": "legacy"}).access_tokens == ("legacy",)
    assert Settings.from_env({"ACCESS_TOKEN": "new", "ACCESS_KEY": "legacy"}).access_tokens == ("new",)
    assert not Settings.from_env({"ACCESS_TOKEN": "new"}).default_token_in_use


def test_base_url_trailing_slash_and_default_params():
    s = Settings.from_env(
        {"OPENAI_BASE_URL": "http://127.0.0.1:8081/v1/", "DEFAULT_GENERATE_PARAMS": '{"temperature": 0.2}'}
    )
    assert s.chat_completions_url == "http://127.0.0.1:8081/v1/chat/completions"
    assert dict(s.default_generate_params) == {"temperature": 0.2}


@pytest.mark.parametrize(
    "name,value",
    [
        ("PORT", "abc"),
        ("PORT", "70000"),
        ("MAX_BODY_BYTES", "-1"),
        ("CONNECT_TIMEOUT", "soon"),
        ("REQUEST_TIMEOUT", "0"),
        ("STREAM_IDLE_TIMEOUT", "inf"),
        ("MAX_CONCURRENT_UPSTREAM", "0"),
        ("DEFAULT_GENERATE_PARAMS", "{not json"),
        ("DEFAULT_GENERATE_PARAMS", "[1, 2]"),
        ("OPENAI_BASE_URL", "ftp://example"),
        ("LOG_FORMAT", "xml"),
        ("METRICS_ENABLED", "maybe"),
        ("TRUSTED_PROXIES", "10.0.0.0/8,not-an-ip"),
        ("ACCESS_TOKEN", ",,"),
        ("TLS_CERTFILE", "/nonexistent/cert.pem"),
        # Set but empty: not the public default token 123456.
        ("ACCESS_TOKEN", ""),
        ("ACCESS_TOKEN", "  "),
        ("ACCESS_KEY", ""),
        ("ACCESS_KEY", " , "),
        ("ALLOWED_MODELS", " , ,"),
        ("OPENAI_BASE_URL", "http://"),
        ("OPENAI_BASE_URL", "https:///v1"),
        ("OPENAI_BASE_URL", "http://:8080/v1"),
        ("OPENAI_BASE_URL", "http://api.example:99999/v1"),
        ("OPENAI_BASE_URL", "http://api.example:0/v1"),
        # The API's paths are appended: a query would end up before them.
        ("OPENAI_BASE_URL", "http://api.example/v1?a=b"),
        ("OPENAI_BASE_URL", "http://api.example/v1?"),
        ("OPENAI_BASE_URL", "http://api.example/v1#part"),
        ("OPENAI_BASE_URL", "http://api example/v1"),
        ("OPENAI_BASE_URL", "http://api%20example/v1"),
        ("OPENAI_BASE_URL", "http://api.example/v 1"),
        ("OPENAI_BASE_URL", "http://api..example/v1"),
        ("OPENAI_BASE_URL", "http://[zz::1]/v1"),
        # What a request's generate_params may not hold, DEFAULT_GENERATE_PARAMS may not either.
        ("DEFAULT_GENERATE_PARAMS", '{"messages": [{"role": "user", "content": "x"}]}'),
        ("DEFAULT_GENERATE_PARAMS", '{"stream": "yes"}'),
        ("DEFAULT_GENERATE_PARAMS", '{"model": ""}'),
        ("DEFAULT_GENERATE_PARAMS", '{"model_name": 5}'),
        # As strict as a request body: these would fail every request with a 500.
        ("DEFAULT_GENERATE_PARAMS", '{"temperature": NaN}'),
        ("DEFAULT_GENERATE_PARAMS", '{"max_tokens": 1e999}'),
        ("DEFAULT_GENERATE_PARAMS", '{"model": "gpt-4o", "model_name": "gpt-4o-mini"}'),
        ("WS_MAX_MESSAGE_BYTES", "10"),
        ("WS_PING_INTERVAL", "-1"),
    ],
)
def test_invalid_values_name_the_variable(name, value):
    env = {name: value}
    if name == "TLS_CERTFILE":
        env["TLS_KEYFILE"] = "/nonexistent/key.pem"
    with pytest.raises(SettingsError) as info:
        Settings.from_env(env)
    message = str(info.value)
    assert message.startswith(name + ":") and "\n" not in message


@pytest.mark.parametrize(
    "name,env",
    [
        ("DEFAULT_MODEL", {"ALLOWED_MODELS": "gpt-4o"}),
        ("DEFAULT_MODEL", {"ALLOWED_MODELS": "gpt-4o", "DEFAULT_MODEL": "gpt-4.1"}),
        ("DEFAULT_GENERATE_PARAMS", {"ALLOWED_MODELS": "gpt-4o-mini", "DEFAULT_GENERATE_PARAMS": '{"model": "o3"}'}),
        (
            "DEFAULT_GENERATE_PARAMS",
            {"ALLOWED_MODELS": "gpt-4o-mini", "DEFAULT_GENERATE_PARAMS": '{"model_name": "o3"}'},
        ),
        ("ACCESS_TOKEN", {"ACCESS_TOKEN": "", "ACCESS_KEY": "legacy-token"}),
    ],
)
def test_settings_that_contradict_each_other_name_the_variable(name, env):
    with pytest.raises(SettingsError) as info:
        Settings.from_env(env)
    message = str(info.value)
    assert message.startswith(name + ":") and "\n" not in message


@pytest.mark.parametrize(
    "value",
    [
        "http://user:base-url-pw@api.example/v1",
        "https://:base-url-pw@api.example/v1",
        "ftp://u:base-url-pw@x/v1",
        # A "/" in the password: the URL parser takes "base-url" for a port.
        "http://user:base-url-pw/x@api.example/v1",
        "http://user:base-url-pw?x@api.example/v1",
    ],
)
def test_credentials_in_openai_base_url_are_refused_and_never_shown(value):
    """They would go with every request and be printed in the startup configuration line."""
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"OPENAI_BASE_URL": value})
    assert str(info.value).startswith("OPENAI_BASE_URL:") and "base-url-pw" not in str(info.value)


@pytest.mark.parametrize(
    "value", ["http://vllm:8000/v1", "http://my_llm:8000/v1", "https://api.openai.com/v1", "http://[::1]:1/v1"]
)
def test_good_openai_base_urls(value):
    assert Settings.from_env({"OPENAI_BASE_URL": value}).openai_base_url == value


def test_consistent_settings_are_accepted():
    s = Settings.from_env(
        {
            "ALLOWED_MODELS": "gpt-4o-mini, gpt-4o",
            "DEFAULT_MODEL": "gpt-4o",
            "DEFAULT_GENERATE_PARAMS": '{"model_name": "gpt-4o-mini", "stream": false, "temperature": 0}',
            "OPENAI_BASE_URL": "http://[::1]:8081/v1",
        }
    )
    assert s.allowed_models == ("gpt-4o-mini", "gpt-4o") and s.default_model == "gpt-4o"
    # model_name is the caller's spelling: upstream it is model, as for a request.
    assert dict(s.default_generate_params) == {"model": "gpt-4o-mini", "stream": False, "temperature": 0}
    # An empty ALLOWED_MODELS is unset, like every other variable; only ACCESS_TOKEN/ACCESS_KEY refuse empty.
    assert Settings.from_env({"ALLOWED_MODELS": ""}).allowed_models == ()
    assert Settings.from_env({"ACCESS_TOKEN": "tok", "ACCESS_KEY": ""}).access_tokens == ("tok",)


def test_masked_hides_every_token():
    s = Settings.from_env({"ACCESS_TOKEN": "supersecret-token-1,tok2"})
    assert s.masked()["access_tokens"] == ["***", "***"]
    # Not even its first characters ("su***" of the default 123456 is a third of it).
    assert "su" not in repr(s.masked()["access_tokens"])


@pytest.mark.parametrize(
    "name,value",
    [("PORT", "not-a-port"), ("ACCESS_TOKEN", ""), ("DEFAULT_GENERATE_PARAMS", '{"messages": []}')],
)
def test_server_refuses_to_start_with_one_line_error(name, value):
    env = {k: v for k, v in os.environ.items() if k not in ("ACCESS_TOKEN", "ACCESS_KEY")}
    env[name] = value
    proc = subprocess.run([sys.executable, "server.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and name + ":" in lines[0], proc.stderr


class RecordingEnviron(dict):
    """An environment that notes every variable the settings look up."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read: set[str] = set()

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)


def settings_table() -> dict[str, str]:
    """docs/settings.md's table: each variable it names, with the default column of its row."""
    text = (pathlib.Path(ROOT) / "docs" / "settings.md").read_text()
    rows = {}
    for line in text.splitlines():
        if not line.startswith("| `"):
            continue
        names_cell, default_cell = line.split(" | ")[0:2]
        for name in re.findall(r"`([A-Za-z_]+)`", names_cell):
            rows[name] = default_cell
    return rows


def test_the_settings_table_names_exactly_the_variables_the_proxy_reads():
    read = set()
    # An http:// upstream also reads http_proxy; an https:// one reads HTTPS_PROXY.
    for environ in ({}, {"OPENAI_BASE_URL": "http://127.0.0.1:1/v1"}):
        recording = RecordingEnviron(environ)
        Settings.from_env(recording)
        read |= recording.read
    assert set(settings_table()) == read


def test_the_settings_table_gives_each_declared_default():
    table = settings_table()
    for variable in VARIABLES:
        default = getattr(Settings, variable.field)
        if isinstance(default, bool):
            shown = "true" if default else "false"
        elif isinstance(default, (int, float)):
            shown = "%g" % default if isinstance(default, float) else str(default)
        else:
            continue
        assert table[variable.name].startswith("`%s`" % shown), (variable.name, table[variable.name])


def test_admin_token_file_is_created_once_and_read_after(tmp_path):
    path = tmp_path / "admin-token"
    first = Settings.from_env({"ADMIN_TOKEN_FILE": str(path)})
    assert first.admin_token_generated and len(first.admin_token) >= 32
    assert path.read_text() == first.admin_token + "\n" and path.stat().st_mode & 0o777 == 0o600
    again = Settings.from_env({"ADMIN_TOKEN_FILE": str(path)})
    assert again.admin_token == first.admin_token and not again.admin_token_generated
    assert first.admin_token not in json.dumps(first.masked(), default=str)


@pytest.mark.parametrize(
    "content,env,message",
    [
        ("short\n", {}, "must be 16 or more visible ASCII characters"),
        ("a-long-enough-admin-token\n", {"ADMIN_TOKEN": "x" * 20}, "set ADMIN_TOKEN or ADMIN_TOKEN_FILE, not both"),
        (None, {}, "cannot create"),
    ],
)
def test_admin_token_file_problems_stop_the_start(tmp_path, content, env, message):
    path = tmp_path / "admin-token" if content is not None else tmp_path / "no-such-folder" / "admin-token"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SettingsError) as error:
        Settings.from_env({"ADMIN_TOKEN_FILE": str(path), **env})
    assert str(error.value).startswith("ADMIN_TOKEN_FILE: ") and message in str(error.value)
    assert content is None or content.strip() not in str(error.value)


def test_pid_file_and_ledger_folders_must_exist(tmp_path):
    assert Settings.from_env({"PID_FILE": str(tmp_path / "proxy.pid")}).pid_file == str(tmp_path / "proxy.pid")
    with pytest.raises(SettingsError, match="^PID_FILE: the folder .* does not exist"):
        Settings.from_env({"PID_FILE": "/no/such/folder/proxy.pid"})
    with pytest.raises(SettingsError) as error:
        Settings.from_env({"USAGE_DATABASE": "/no/such/folder/usage.sqlite3"})
    assert "does not exist; create it, or name a file in an existing one" in str(error.value)


def test_every_setting_is_in_one_part_of_the_startup_configuration():
    parts = Settings().masked_parts()
    named = [name for _, values in parts for name in values]
    assert sorted(named) == sorted(field.name for field in dataclasses.fields(Settings))
    assert len(named) == len(set(named))
    assert [part for part, _ in parts][:3] == ["listen", "access", "upstream"]
