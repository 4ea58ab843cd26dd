"""Configuration: precedence, strictness, secrets, and the example file kept in sync."""

from __future__ import annotations

import datetime as dt
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, SecretStr
from sqlalchemy.engine import make_url

from dsf_bridge.config import Settings, display_settings, load_settings, secret_settings
from dsf_bridge.errors import ConfigError
from dsf_bridge.runtime.daemon import _runtime_settings

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "config.example.toml"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bridge.toml"
    path.write_text(text)
    return path


def test_defaults_without_any_source() -> None:
    settings = load_settings(environ={})
    assert settings.db.url == "sqlite:///dsf-bridge.db"
    assert settings.log.level == "info"
    assert settings.dsf.fhir_base_url is None


def test_precedence_flags_over_environment_over_file(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        '[db]\nurl = "sqlite:///from-file.db"\npool_size = 3\n[log]\nlevel = "debug"\n',
    )
    env = {"DSF_BRIDGE_DB__URL": "sqlite:///from-env.db", "DSF_BRIDGE_DB__POOL_SIZE": "7"}

    from_file = load_settings(path, environ={})
    from_env = load_settings(path, environ=env)
    from_flag = load_settings(path, {"db": {"url": "sqlite:///from-flag.db"}}, environ=env)

    assert from_file.db.url == "sqlite:///from-file.db"
    assert from_env.db.url == "sqlite:///from-env.db"
    assert from_flag.db.url == "sqlite:///from-flag.db"
    # Sections merge key by key: the flag replaced only db.url.
    assert from_flag.db.pool_size == 7
    assert from_flag.log.level == "debug"


def test_config_file_from_environment_variable(tmp_path: Path) -> None:
    path = _write(tmp_path, '[log]\nformat = "json"\n')
    assert load_settings(environ={"DSF_BRIDGE_CONFIG": str(path)}).log.format == "json"


def test_plain_urls_accepted_as_written() -> None:
    for url in ("sqlite:///x.db", "postgresql://postgres@127.0.0.1:5432/test"):
        assert load_settings(None, {"db": {"url": url}}, environ={}).db.url == url


@pytest.mark.parametrize(
    ("toml", "field"),
    [
        ('[db]\nurll = "sqlite:///x.db"\n', "db.urll"),
        ('[dbs]\nurl = "x"\n', "dbs"),
        ("[db]\npool_size = 0\n", "db.pool_size"),
        ('[db]\nurl = "mysql://root@localhost/x"\n', "db.url"),
        ('[db]\nurl = "sqlite://x.db"\n', "db.url"),
        ('[log]\nlevel = "loud"\n', "log.level"),
        ('[dsf]\nfhir_base_url = "http://dsf.example.org/fhir"\n', "dsf.fhir_base_url"),
        # Without a scheme every consortium request would fail at its cohort search.
        (
            '[omi.consortium]\ndicomweb_url = "orthanc:8042/dicom-web"\n',
            "omi.consortium.dicomweb_url",
        ),
        (
            '[omi.consortium]\ndicomweb_url = "ftp://pacs/dicom-web"\n',
            "omi.consortium.dicomweb_url",
        ),
    ],
)
def test_bad_file_names_the_field(tmp_path: Path, toml: str, field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(_write(tmp_path, toml), environ={})
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}:")


@pytest.mark.parametrize("name", ["DEBUG", "Debug", "debug"])
def test_log_level_names_in_any_case(name: str) -> None:
    settings = load_settings(
        environ={"DSF_BRIDGE_LOG__LEVEL": name, "DSF_BRIDGE_LOG__FORMAT": "JSON"}
    )
    assert (settings.log.level, settings.log.format) == ("debug", "json")


def test_a_wrong_log_level_names_the_field_and_the_choices() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={"DSF_BRIDGE_LOG__LEVEL": "VERBOSE"})
    assert caught.value.field == "log.level"
    assert "'debug', 'info', 'warning' or 'error'" in str(caught.value)


def test_unknown_environment_variable_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={"DSF_BRIDGE_DB__ULR": "sqlite:///x.db"})
    assert caught.value.field == "DSF_BRIDGE_DB__ULR"


def test_other_prefixed_variables_are_not_settings() -> None:
    settings = load_settings(
        environ={"DSF_BRIDGE_REFERENCE_DIR": "/x", "DSF_BRIDGE_TEST_POSTGRES_URL": "y"}
    )
    assert settings == Settings()


def test_single_underscore_typo_is_refused_with_the_fix() -> None:
    with pytest.raises(ConfigError, match="DSF_BRIDGE_DB__URL") as caught:
        load_settings(environ={"DSF_BRIDGE_DB_URL": "sqlite:///x.db"})
    assert caught.value.field == "DSF_BRIDGE_DB_URL"


def test_bad_environment_value_names_the_field() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={"DSF_BRIDGE_DB__POOL_SIZE": "many"})
    assert caught.value.field == "db.pool_size"


def test_list_from_environment_json_or_commas() -> None:
    as_json = load_settings(environ={"DSF_BRIDGE_DSF__CA_CERTIFICATES": '["a.pem", "b.pem"]'})
    as_commas = load_settings(environ={"DSF_BRIDGE_DSF__CA_CERTIFICATES": "a.pem, b.pem"})
    assert (
        as_json.dsf.ca_certificates
        == as_commas.dsf.ca_certificates
        == [
            Path("a.pem"),
            Path("b.pem"),
        ]
    )


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "absent.toml", environ={})
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(_write(tmp_path, "[db\n"), environ={})


def test_secrets_are_hidden_in_display() -> None:
    settings = load_settings(
        None,
        {"db": {"url": "postgresql://bridge:hunter2@db:5432/x"}},
        environ={"DSF_BRIDGE_DSF__CLIENT_KEY_PASSWORD": "s3cret-pass"},
    )
    shown = display_settings(settings)
    assert shown["db"]["url"] == "postgresql://bridge:***@db:5432/x"
    assert shown["dsf"]["client_key_password"] == "***"
    assert "hunter2" not in repr(shown) and "s3cret-pass" not in repr(shown)
    assert settings.dsf.client_key_password is not None
    assert settings.dsf.client_key_password.get_secret_value() == "s3cret-pass"


@pytest.mark.parametrize(
    ("variable", "content", "read"),
    [
        ("DSF_BRIDGE_API__TOKEN_FILE", "token-from-a-docker-secret\n", "api.token"),
        ("DSF_BRIDGE_API__OPERATOR_TOKEN_FILE", "operator-token-from-a-file", "api.operator_token"),
        ("DSF_BRIDGE_DSF__CLIENT_KEY_PASSWORD_FILE", "key pass\r\n", "dsf.client_key_password"),
        ("DSF_BRIDGE_DB__URL_FILE", "postgresql://u:pw@db:5432/x\n", "db.url"),
        (
            "DSF_BRIDGE_PSEUDONYMIZATION__SECRET_FILE",
            "a-site-key-of-at-least-32-characters\n",
            "pseudonymization.secret",
        ),
    ],
)
def test_every_secret_from_a_file(tmp_path: Path, variable: str, content: str, read: str) -> None:
    secret = tmp_path / "secret"
    secret.write_text(content)
    env = {variable: str(secret)}
    if read == "api.operator_token":
        env["DSF_BRIDGE_API__TOKEN"] = "the-read-only-token"
    settings = load_settings(environ=env)
    section, key = read.split(".")
    value = getattr(getattr(settings, section), key)
    plain = value.get_secret_value() if isinstance(value, SecretStr) else value
    assert plain == content.rstrip("\r\n")


def test_the_secrets_are_every_secret_field_and_the_database_url() -> None:
    assert set(secret_settings()) == {
        "db.url",
        "db.password",
        "dsf.client_key_password",
        "pseudonymization.secret",
        "api.token",
        "api.operator_token",
        "proxy.password",
    }


def test_a_secret_set_twice_names_both_variables(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("token-from-a-docker-secret")
    with pytest.raises(ConfigError) as caught:
        load_settings(
            environ={
                "DSF_BRIDGE_API__TOKEN": "token-from-the-environment",
                "DSF_BRIDGE_API__TOKEN_FILE": str(secret),
            }
        )
    assert "DSF_BRIDGE_API__TOKEN and DSF_BRIDGE_API__TOKEN_FILE" in str(caught.value)
    assert "token-from" not in str(caught.value)


def test_an_unreadable_secret_file_names_the_variable_and_the_path(tmp_path: Path) -> None:
    for path, reason in (
        (tmp_path / "absent", "No such file or directory"),
        (tmp_path, "Is a directory"),
    ):
        with pytest.raises(ConfigError) as caught:
            load_settings(environ={"DSF_BRIDGE_DSF__CLIENT_KEY_PASSWORD_FILE": str(path)})
        assert caught.value.field == "DSF_BRIDGE_DSF__CLIENT_KEY_PASSWORD_FILE"
        assert str(caught.value) == (
            f"DSF_BRIDGE_DSF__CLIENT_KEY_PASSWORD_FILE: cannot read {path}: {reason}"
        )
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match=f"DSF_BRIDGE_API__TOKEN_FILE: {empty} is empty"):
        load_settings(environ={"DSF_BRIDGE_API__TOKEN_FILE": str(empty)})


def test_a_bad_secret_from_a_file_is_never_printed(tmp_path: Path) -> None:
    short = tmp_path / "token"
    short.write_text("tiny-secret\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={"DSF_BRIDGE_API__TOKEN_FILE": str(short)})
    assert caught.value.field == "api.token"
    assert "tiny-secret" not in str(caught.value)
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfehidden")
    with pytest.raises(ConfigError, match="not UTF-8 text") as caught:
        load_settings(environ={"DSF_BRIDGE_API__TOKEN_FILE": str(binary)})
    assert caught.value.__cause__ is None and "hidden" not in str(caught.value)


def test_only_secrets_come_from_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="only secrets are read from a file") as caught:
        load_settings(environ={"DSF_BRIDGE_DB__POOL_SIZE_FILE": str(tmp_path)})
    assert caught.value.field == "DSF_BRIDGE_DB__POOL_SIZE_FILE"
    with pytest.raises(ConfigError, match="DSF_BRIDGE_API__TOKEN_FILE"):
        load_settings(environ={"DSF_BRIDGE_API_TOKEN_FILE": str(tmp_path)})


def test_the_database_password_apart_from_the_url(tmp_path: Path) -> None:
    secret = tmp_path / "db-password"
    secret.write_text("p@ss/w:rd%\n")
    settings = load_settings(
        environ={
            "DSF_BRIDGE_DB__URL": "postgresql://bridge@db:5432/x",
            "DSF_BRIDGE_DB__PASSWORD_FILE": str(secret),
        }
    )
    assert make_url(settings.db.url).password == "p@ss/w:rd%"
    assert display_settings(settings)["db"] == {
        "url": "postgresql://bridge:***@db:5432/x",
        "pool_size": 20,
        "echo": False,
        "password": "***",
    }


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("sqlite:///x.db", "names no PostgreSQL server"),
        ("postgresql://bridge:other@db/x", "give one"),
        ("postgresql://db/x", "needs the user"),
    ],
)
def test_a_database_password_that_cannot_apply(url: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as caught:
        load_settings(environ={"DSF_BRIDGE_DB__URL": url, "DSF_BRIDGE_DB__PASSWORD": "pw"})
    assert caught.value.field == "db"


def test_no_proxy_by_default() -> None:
    settings = load_settings(environ={})
    assert settings.proxy.url is None
    assert settings.proxy.forward_proxy() is None


def test_the_proxy_from_file_and_environment(tmp_path: Path) -> None:
    password = tmp_path / "proxy-password"
    password.write_text("proxy-secret\n")
    settings = load_settings(
        _write(tmp_path, '[proxy]\nurl = "http://proxy.example.org:3128/"\nusername = "site"\n'),
        environ={
            "DSF_BRIDGE_PROXY__PASSWORD_FILE": str(password),
            "DSF_BRIDGE_PROXY__NO_PROXY": "localhost, .klinik.example, pacs:8042",
        },
    )
    proxy = settings.proxy.forward_proxy()
    assert proxy is not None
    assert (proxy.url, proxy.auth) == ("http://proxy.example.org:3128", ("site", "proxy-secret"))
    assert proxy.no_proxy == ("localhost", ".klinik.example", "pacs:8042")
    assert proxy.route("https://dsf.other-site.example/fhir") is proxy
    assert proxy.route("http://pacs.klinik.example/dicom-web") is None
    shown = display_settings(settings)["proxy"]
    assert shown["password"] == "***"
    assert "proxy-secret" not in repr(shown)


@pytest.mark.parametrize(
    ("toml", "problem"),
    [
        ('[proxy]\nurl = "https://proxy:3128"\n', "must be an http:// URL"),
        ('[proxy]\nurl = "socks5://proxy:1080"\n', "must be an http:// URL"),
        ('[proxy]\nurl = "http://u:p@proxy:3128"\n', "proxy.username and proxy.password"),
        ('[proxy]\nurl = "http://proxy:3128/path"\n', "without a path"),
        ('[proxy]\nurl = "http://proxy:port"\n', "bad port"),
        ('[proxy]\nno_proxy = ["a b"]\n', "entries are host names"),
        ('[proxy]\nusername = "site"\n', "need proxy.url"),
        ('[proxy]\nurl = "http://proxy:3128"\npassword = "x"\n', "needs proxy.username"),
    ],
)
def test_bad_proxy_settings_name_the_field(tmp_path: Path, toml: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as caught:
        load_settings(_write(tmp_path, toml), environ={})
    assert (caught.value.field or "").startswith("proxy")


def _commented_keys(text: str) -> dict[str, set[str]]:
    """Keys shown commented out (``# key = value``) per section of the example."""
    found: dict[str, set[str]] = {}
    section = ""
    for line in text.splitlines():
        header = re.match(r"^\[([\w.]+)\]$", line)
        if header:
            section = header.group(1)
        commented = re.match(r"^# (\w+) = ", line)
        if commented and section:
            found.setdefault(section, set()).add(commented.group(1))
    return found


def test_example_file_documents_every_setting_with_its_default() -> None:
    text = EXAMPLE.read_text()
    data: dict[str, Any] = tomllib.loads(text)
    commented = _commented_keys(text)
    defaults = display_settings(Settings())

    assert set(data) == set(defaults)
    for section, values in defaults.items():
        documented = set(data[section]) | commented.get(section, set())
        assert documented == set(values), f"[{section}] differs from the settings model"
        for key, value in data[section].items():
            assert value == values[key], f"{section}.{key}: example shows {value!r}"
        for key in commented.get(section, set()):
            assert values[key] is None, f"{section}.{key} has a default; show it uncommented"
        for key, value in values.items():  # a nested section ([omi.consortium])
            if isinstance(value, dict):
                unset = commented.get(f"{section}.{key}", set())
                fields = type(getattr(Settings(), section)).model_fields[key].annotation
                assert isinstance(fields, type) and issubclass(fields, BaseModel)
                assert set(value) | unset == set(fields.model_fields), f"[{section}.{key}]"
                assert all(key_ not in value for key_ in unset), f"[{section}.{key}] {unset}"
    # The example itself is a valid configuration.
    assert load_settings(EXAMPLE, environ={}) == Settings()


def test_omi_catalogue_from_file_and_environment(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        '[omi]\nresult_timeout = "PT30S"\n[[omi.catalogue]]\nid = "tissue-composition"\n'
        'organization = "ai-provider.example.org"\n',
    )
    from_file = load_settings(path, environ={})
    assert from_file.omi.result_timeout == "PT30S"
    [entry] = from_file.omi.catalogue
    assert (entry.id, entry.organization, entry.model_name) == (
        "tissue-composition",
        "ai-provider.example.org",
        None,
    )
    from_env = load_settings(
        environ={"DSF_BRIDGE_OMI__CATALOGUE": '[{"id": "x", "model_name": "m"}]'}
    )
    assert from_env.omi.catalogue[0].model_name == "m"
    # The effective settings: the per-service defaults in force are shown too.
    assert display_settings(from_file)["omi"]["catalogue"] == [
        {
            "id": "tissue-composition",
            "organization": "ai-provider.example.org",
            "tensor_encoding": "auto",
            "max_request_bytes": 1 << 30,
            "max_response_bytes": 256 << 20,
            "transfer": "dsf",
        }
    ]


def test_omi_catalogue_tensor_encoding_and_limits(tmp_path: Path) -> None:
    [default] = load_settings(environ={"DSF_BRIDGE_OMI__CATALOGUE": '[{"id": "x"}]'}).omi.catalogue
    assert (default.tensor_encoding, default.max_slices) == ("auto", None)
    assert (default.max_request_bytes, default.max_response_bytes) == (1 << 30, 256 << 20)
    toml = (
        '[[omi.catalogue]]\nid = "x"\ntensor_encoding = "binary"\nmax_slices = 400\n'
        "max_request_bytes = 1000\nmax_response_bytes = 2000\n"
    )
    [entry] = load_settings(_write(tmp_path, toml), environ={}).omi.catalogue
    assert (entry.tensor_encoding, entry.max_slices) == ("binary", 400)
    assert (entry.max_request_bytes, entry.max_response_bytes) == (1000, 2000)


@pytest.mark.parametrize(
    ("toml", "field"),
    [
        ('[omi]\nresult_timeout = "10 minutes"\n', "omi.result_timeout"),
        # Longer than a start Task may ask for: every request would fail as if it had.
        ('[omi]\nresult_timeout = "P2Y"\n', "omi.result_timeout"),
        ('[omi]\nresult_timeout = "P9999Y"\n', "omi.result_timeout"),
        ('[[omi.catalogue]]\nid = "x"\nmodel = "m"\n', "omi.catalogue.0.model"),
        (
            '[[omi.catalogue]]\nid = "x"\ntensor_encoding = "xml"\n',
            "omi.catalogue.0.tensor_encoding",
        ),
        ('[[omi.catalogue]]\nid = "x"\nmax_slices = 0\n', "omi.catalogue.0.max_slices"),
        (
            '[[omi.catalogue]]\nid = "x"\nmax_request_bytes = 0\n',
            "omi.catalogue.0.max_request_bytes",
        ),
    ],
)
def test_bad_omi_settings_name_the_field(tmp_path: Path, toml: str, field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(_write(tmp_path, toml), environ={})
    assert caught.value.field == field


def test_the_removed_dicomweb_attempts_points_to_the_one_retry_policy(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(_write(tmp_path, "[omi]\ndicomweb_attempts = 3\n"), environ={})
    assert "omi.dicomweb_attempts" in str(caught.value)
    assert "[runtime] call_attempts" in str(caught.value)


def test_the_call_retry_policy_from_the_runtime_section(tmp_path: Path) -> None:
    toml = "[runtime]\ncall_attempts = 2\ncall_retry_delay = 0.25\nretry_after_cap = 5\n"
    policy = load_settings(_write(tmp_path, toml), environ={}).runtime.call_retry()
    assert (policy.attempts, policy.delay(1), policy.delay(2), policy.retry_after_cap) == (
        2,
        0.25,
        0.5,
        5.0,
    )
    # The bridge hands this one policy to its FHIR clients and to plugins (SERVICE_CALL_RETRY).
    runtime = _runtime_settings(load_settings(_write(tmp_path, toml), environ={}).runtime)
    assert runtime.call_retry == policy


def test_a_year_is_the_longest_result_timeout(tmp_path: Path) -> None:
    settings = load_settings(_write(tmp_path, '[omi]\nresult_timeout = "P1Y"\n'), environ={})
    assert settings.omi.result_timeout == "P1Y"


def test_the_runtime_policy_from_file_and_environment(tmp_path: Path) -> None:
    settings = load_settings(
        _write(tmp_path, "[runtime]\nlease = 5\njob_retries = 0\n"),
        environ={
            "DSF_BRIDGE_RUNTIME__OUTBOX_RETRY_DELAYS": "[0.5, 2]",
            "DSF_BRIDGE_RUNTIME__SHUTDOWN_GRACE": "3",
        },
    )
    assert settings.runtime.lease == 5.0
    assert settings.runtime.job_retries == 0
    assert settings.runtime.outbox_retry_delays == [0.5, 2.0]
    assert settings.runtime.shutdown_grace == 3.0
    assert settings.runtime.idle_poll == 1.0
    assert settings.runtime.inline_handler_budget == 0.05
    zero = load_settings(_write(tmp_path, "[runtime]\ninline_handler_budget = 0\n"), environ={})
    assert _runtime_settings(zero.runtime).inline_handler_budget == dt.timedelta(0)


@pytest.mark.parametrize(
    ("toml", "field"),
    [
        ("[runtime]\nlease = 0.5\n", "runtime.lease"),
        ("[runtime]\njob_retries = -1\n", "runtime.job_retries"),
        ("[runtime]\ncall_attempts = 0\n", "runtime.call_attempts"),
        ("[runtime]\ncall_retry_delay = -1\n", "runtime.call_retry_delay"),
        ("[runtime]\noutbox_retry_delays = []\n", "runtime.outbox_retry_delays"),
        ("[runtime]\noutbox_retry_delays = [1, 0]\n", "runtime.outbox_retry_delays"),
        ("[runtime]\nidle_poll = 0\n", "runtime.idle_poll"),
        ("[runtime]\nshutdown_grace = -1\n", "runtime.shutdown_grace"),
        ("[runtime]\ninline_handler_budget = -0.1\n", "runtime.inline_handler_budget"),
        ("[runtime]\ninline_handler_budget = 11\n", "runtime.inline_handler_budget"),
        ("[runtime]\nlease = 20\nshutdown_grace = 30\n", "runtime"),
    ],
)
def test_bad_runtime_settings_name_the_field(tmp_path: Path, toml: str, field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(_write(tmp_path, toml), environ={})
    assert caught.value.field == field


def test_pseudonymization_settings_from_file_and_environment(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        '[pseudonymization]\ndates = "keep"\nrefused_modalities = ["us", " sc"]\n'
        'safe_private = ["GEMS_PARM_01:39", "SIEMENS MED:0A"]\n',
    )
    settings = load_settings(
        path, environ={"DSF_BRIDGE_PSEUDONYMIZATION__SECRET": "k" * 32 + "\n"}
    ).pseudonymization
    assert settings.enabled is True
    assert settings.dates == "keep"
    assert settings.refused_modalities == ["US", "SC"]
    assert settings.safe_private_attributes() == {("GEMS_PARM_01", 0x39), ("SIEMENS MED", 0x0A)}
    assert settings.secret is not None and settings.secret.get_secret_value() == "k" * 32
    assert display_settings(load_settings(path, environ={}))["pseudonymization"]["secret"] is None


@pytest.mark.parametrize(
    ("toml", "problem"),
    [
        ('[pseudonymization]\ndates = "jitter"\n', "pseudonymization.dates"),
        ('[pseudonymization]\nsecret = "too short"\n', "at least 32 characters"),
        ('[pseudonymization]\nrefused_modalities = ["U S"]\n', "not a DICOM modality"),
        ('[pseudonymization]\nsafe_private = ["GEMS_PARM_01"]\n', "two hex digits"),
        ('[pseudonymization]\nsafe_private = ["GEMS_PARM_01:1039"]\n', "two hex digits"),
    ],
)
def test_bad_pseudonymization_settings_name_the_problem(
    tmp_path: Path, toml: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(_write(tmp_path, toml), environ={})
    assert (caught.value.field or "").startswith("pseudonymization")
    assert problem in str(caught.value) or problem == caught.value.field


def test_a_heartbeat_interval_requesters_would_call_stale_is_refused() -> None:
    """Review: up to 3600 s was accepted, but requesting sites refuse a heartbeat older than
    ten minutes: the service was refused for most of every interval."""
    omi = {"registry_url": "http://registry.test/fhir"}
    assert (
        load_settings(None, {"omi": {**omi, "heartbeat_interval": 300}}).omi.heartbeat_interval
        == 300
    )
    with pytest.raises(ConfigError, match="heartbeat_interval"):
        load_settings(None, {"omi": {**omi, "heartbeat_interval": 900}})
