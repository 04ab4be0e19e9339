"""Settings: read once, environment over .env, bad values name the variable, secrets hidden."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from config import Secret, Settings
from errors import ConfigError


def test_defaults() -> None:
    settings = Settings.from_env({}, env_file=None)
    assert settings.amqp_url.get() == "amqp://guest:guest@localhost:5672/"
    assert settings.smtp_security == "ssl"
    assert settings.smtp_port == 465
    assert (settings.host, settings.port) == ("127.0.0.1", 5000)
    assert settings.smtp_host is None
    assert settings.smtp_username is None and settings.smtp_password is None
    assert settings.talktome_log == Path("var/log/messaging_system.log")
    assert settings.message_retention_days == 30
    assert (
        Settings.from_env({"MESSAGE_RETENTION_DAYS": "0"}, env_file=None).message_retention_days
        == 0
    )


def test_prefetch_follows_concurrency_unless_set() -> None:
    assert (Settings().worker_concurrency, Settings().worker_prefetch) == (16, 128)
    default = Settings.from_env({}, env_file=None)
    assert (default.worker_concurrency, default.worker_prefetch) == (16, 128)
    derived = Settings.from_env({"WORKER_CONCURRENCY": "5"}, env_file=None)
    assert derived.worker_prefetch == 40
    both = {"WORKER_CONCURRENCY": "5", "WORKER_PREFETCH": "5"}
    assert Settings.from_env(both, env_file=None).worker_prefetch == 5
    assert Settings(worker_concurrency=100).worker_prefetch == 800
    assert Settings.from_env({}, env_file=None).worker_priority == 0
    assert Settings.from_env({"WORKER_PRIORITY": "-100"}, env_file=None).worker_priority == -100
    with pytest.raises(ValueError, match="worker_prefetch"):
        Settings(worker_concurrency=8, worker_prefetch=4)
    with pytest.raises(ValueError, match="worker_priority"):
        Settings(worker_priority=-101)


@pytest.mark.parametrize(("security", "port"), [("ssl", 465), ("starttls", 587), ("none", 25)])
def test_default_port_follows_security(security: str, port: int) -> None:
    assert Settings.from_env({"SMTP_SECURITY": security}, env_file=None).smtp_port == port


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"PORT": "abc"}, "PORT"),
        ({"PORT": "70000"}, "PORT"),
        ({"SMTP_PORT": "0"}, "SMTP_PORT"),
        ({"SMTP_SECURITY": "tls"}, "SMTP_SECURITY"),
        ({"AMQP_URL": "http://rabbit/"}, "AMQP_URL"),
        ({"AMQP_URL": "amqp://guest:pa#ss@localhost:5x72/"}, "AMQP_URL"),
        ({"WORKER_CONCURRENCY": "0"}, "WORKER_CONCURRENCY"),
        ({"WORKER_PREFETCH": "0"}, "WORKER_PREFETCH"),
        ({"WORKER_PREFETCH": "many"}, "WORKER_PREFETCH"),
        ({"WORKER_CONCURRENCY": "8", "WORKER_PREFETCH": "7"}, "WORKER_PREFETCH"),
        ({"WORKER_PRIORITY": "101"}, "WORKER_PRIORITY"),
        ({"WORKER_PRIORITY": "low"}, "WORKER_PRIORITY"),
        ({"SMTP_TIMEOUT": "-1"}, "SMTP_TIMEOUT"),
        ({"PUBLISH_TIMEOUT": "soon"}, "PUBLISH_TIMEOUT"),
        ({"ATTEMPT_LEASE": "0.5"}, "ATTEMPT_LEASE"),
        ({"ATTEMPT_LEASE": "forever"}, "ATTEMPT_LEASE"),
        ({"SMTP_PASSWORD": "x"}, "SMTP_USERNAME"),
        ({"SMTP_USERNAME": "x@example.com"}, "SMTP_PASSWORD"),
        ({"MAIL_FROM": "nobody"}, "MAIL_FROM"),
        ({"QUEUE_PREFIX": "has space"}, "QUEUE_PREFIX"),
        ({"LOG_LEVEL": "loud"}, "LOG_LEVEL"),
        ({"SMTP_CA_FILE": "/no/such/ca.pem"}, "SMTP_CA_FILE"),
        ({"MESSAGE_RETENTION_DAYS": "-1"}, "MESSAGE_RETENTION_DAYS"),
        ({"MESSAGE_RETENTION_DAYS": "2.5"}, "MESSAGE_RETENTION_DAYS"),
        ({"SMTP_HELO_NAME": "two words"}, "SMTP_HELO_NAME"),
        ({"SMTP_HELO_NAME": "bücher.example"}, "SMTP_HELO_NAME"),
        ({"SMTP_HELO_NAME": "-dash.example"}, "SMTP_HELO_NAME"),
        ({"MAX_SCHEDULE_DAYS": "0"}, "MAX_SCHEDULE_DAYS"),
        ({"SANDBOX": "maybe"}, "SANDBOX"),
        (
            {"WEBHOOK_URLS": "http://hooks.example.com/x", "WEBHOOK_SECRET": "s" * 16},
            "WEBHOOK_URLS",
        ),
        ({"WEBHOOK_URLS": "ftp://127.0.0.1/x", "WEBHOOK_SECRET": "s" * 16}, "WEBHOOK_URLS"),
        ({"WEBHOOK_URLS": "https://hooks.example.com/x"}, "WEBHOOK_SECRET"),
        ({"WEBHOOK_SECRET": "short"}, "WEBHOOK_SECRET"),
    ],
)
def test_bad_value_names_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env, env_file=None)
    assert info.value.variable == variable
    assert str(info.value).startswith(f"{variable}: ")


@pytest.mark.parametrize(
    "name", ["mailer.example.org", "xn--bcher-kva.example", "host-1", "[192.0.2.1]", "[IPv6:::1]"]
)
def test_helo_name(name: str) -> None:
    assert Settings.from_env({}, env_file=None).smtp_helo_name is None  # the machine's name
    assert Settings.from_env({"SMTP_HELO_NAME": name}, env_file=None).smtp_helo_name == name


def test_environment_wins_over_dotenv(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("PORT=6000\nHOST=0.0.0.0\nSMTP_HOST=smtp.example.com\n")
    settings = Settings.from_env({"PORT": "7000"}, env_file=env_file)
    assert settings.port == 7000
    assert settings.host == "0.0.0.0"
    assert settings.smtp_host == "smtp.example.com"


def test_legacy_credential_names() -> None:
    settings = Settings.from_env(
        {"EMAIL_USERNAME": "me@example.com", "EMAIL_PASSWORD": "pw"}, env_file=None
    )
    assert settings.smtp_username == "me@example.com"
    assert settings.smtp_password == Secret("pw")
    assert settings.mail_from == "me@example.com"  # defaults to the username


def test_empty_setting_in_environment_unsets_the_dotenv_one(tmp_path: Path) -> None:
    """What "Running the pieces by hand" relies on: SMTP_USERNAME= SMTP_PASSWORD= in the
    environment mean no login, whatever .env says under the new or the old names."""
    env_file = tmp_path / ".env"
    env_file.write_text(
        "SMTP_HOST=smtp.example.com\nSMTP_USERNAME=me@example.com\nSMTP_PASSWORD=pw\n"
        "EMAIL_USERNAME=old@example.com\nEMAIL_PASSWORD=old-pw\n"
    )
    settings = Settings.from_env(
        {"SMTP_HOST": "127.0.0.1", "SMTP_USERNAME": "", "SMTP_PASSWORD": ""}, env_file=env_file
    )
    assert settings.smtp_host == "127.0.0.1"
    assert settings.smtp_username is None and settings.smtp_password is None
    assert settings.mail_from == "mailroom@localhost"


def test_secrets_never_show(caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings.from_env(
        {
            "SMTP_USERNAME": "me@example.com",
            "SMTP_PASSWORD": "hunter2-very-secret",
            "AMQP_URL": "amqp://user:amqp-pass-123@rabbit.example:5672/prod",
        },
        env_file=None,
    )
    caplog.set_level(logging.DEBUG)
    logging.getLogger("test").info("settings %s %r", settings, settings)
    shown = repr(settings) + str(settings) + caplog.text + repr(settings.smtp_password)
    assert "hunter2-very-secret" not in shown
    assert "amqp-pass-123" not in shown
    assert "amqp://user:***@rabbit.example:5672/prod" in repr(settings)
    assert settings.amqp_url.get().endswith("@rabbit.example:5672/prod")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("amqp://guest:pa#ss@localhost/", "amqp://guest:***@localhost/"),
        ("amqp://u:p/a?s@host:5672/v", "amqp://u:***@host:5672/v"),
        (
            "postgresql://u@db.example/mail?password=s3cret",
            "postgresql://u@db.example/mail?password=***",
        ),
        ("postgresql://u:s3cret@db.example/mail", "postgresql://u:***@db.example/mail"),
        ("sqlite:///var/mailroom.db", "sqlite:///var/mailroom.db"),
    ],
)
def test_urls_are_redacted_even_when_odd(url: str, shown: str) -> None:
    from config import redact_url

    assert redact_url(url) == shown


def test_settings_are_frozen() -> None:
    settings = Settings.from_env({}, env_file=None)
    with pytest.raises(AttributeError):
        settings.port = 1  # type: ignore[misc]


def test_webhook_settings() -> None:
    settings = Settings.from_env(
        {
            "WEBHOOK_URLS": "https://hooks.example.com/a, http://127.0.0.1:9000/b,http://[::1]/c",
            "WEBHOOK_SECRET": "webhook-secret-value-42",
        },
        env_file=None,
    )
    assert settings.webhook_urls == (
        "https://hooks.example.com/a",
        "http://127.0.0.1:9000/b",
        "http://[::1]/c",
    )
    assert "webhook-secret-value-42" not in repr(settings)
