"""RemoteSettings: invalid settings fail at construction, naming the setting, hiding secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

from downloaders import RemoteSettings, SettingsError
from importer.remote import Remote
from tests.support.certs import Certs

URL = "https://example.org/repo/"


def settings_error(**kwargs: object) -> SettingsError:
    with pytest.raises(SettingsError) as caught:
        RemoteSettings(url=URL, **kwargs)
    return caught.value


def test_defaults_are_valid() -> None:
    remote = RemoteSettings(url=URL)
    assert remote.download_concurrency == 10
    assert remote.tls_validation is True
    assert remote.max_redirects == 10


@pytest.mark.parametrize(
    "setting, value",
    [
        ("download_concurrency", 0),
        ("download_concurrency", -1),
        ("max_retries", -1),
        ("connect_timeout", -0.5),
        ("sock_read_timeout", -1),
        ("total_timeout", -1),
        ("rate_limit", -2),
        ("max_redirects", -1),
        ("download_concurrency", "4"),
    ],
)
def test_negative_or_wrong_limits(setting: str, value: object) -> None:
    error = settings_error(**{setting: value})
    assert error.setting == setting
    assert str(error).startswith(f"{setting}: ")


@pytest.mark.parametrize(
    "proxy_url", ["http://:3128", "http://", "ftp://proxy:21", "http://u:pw@:3128", "proxy:3128"]
)
def test_proxy_url_needs_http_and_a_host(proxy_url: str) -> None:
    error = settings_error(proxy_url=proxy_url)
    assert error.setting == "proxy_url"
    assert "pw" not in str(error)


def test_bad_proxy_port_never_shows_the_password() -> None:
    error = settings_error(proxy_url="http://user:hunter2@proxy:99999")
    assert error.setting == "proxy_url"
    assert "hunter2" not in str(error)


def test_unreadable_ca_cert(tmp_path: Path) -> None:
    error = settings_error(ca_cert=str(tmp_path / "missing.pem"))
    assert error.setting == "ca_cert"
    assert "cannot read" in str(error)


def test_invalid_ca_cert_pem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n")
    error = settings_error(ca_cert=str(bad))
    assert error.setting == "ca_cert"
    empty = tmp_path / "empty.pem"
    empty.write_text("no certificates here\n")
    assert settings_error(ca_cert=str(empty)).setting == "ca_cert"


def test_client_cert_without_key_and_key_without_cert(certs: Certs) -> None:
    assert settings_error(client_cert=str(certs.client_cert)).setting == "client_cert"
    assert settings_error(client_key=str(certs.client_key)).setting == "client_key"


def test_client_key_not_matching_certificate(certs: Certs) -> None:
    error = settings_error(
        client_cert=str(certs.client_cert), client_key=str(certs.untrusted_client_key)
    )
    assert error.setting == "client_key"
    assert "does not match" in str(error)


def test_valid_tls_files(certs: Certs) -> None:
    remote = RemoteSettings(
        url=URL,
        ca_cert=str(certs.ca_pem),
        client_cert=str(certs.client_cert),
        client_key=str(certs.client_key),
    )
    assert remote.client_key == str(certs.client_key)
    # A combined PEM (certificate and key in one file) needs no client_key.
    RemoteSettings(url=URL, client_cert=str(certs.client_pem))


def test_key_file_that_is_no_key(certs: Certs) -> None:
    error = settings_error(client_cert=str(certs.client_cert), client_key=str(certs.ca_pem))
    assert error.setting == "client_key"


def test_secrets_never_in_repr() -> None:
    remote = RemoteSettings(
        url=URL,
        username="alice",
        password="s3cret-pw",
        proxy_url="http://bob:s3cret-proxy@proxy.example:3128",
        proxy_username="carol",
        proxy_password="s3cret-pp",
        headers={"Authorization": "Bearer s3cret-token", "X-Other": "visible"},
    )
    text = repr(remote)
    for secret in ("s3cret-pw", "s3cret-proxy", "s3cret-pp", "s3cret-token"):
        assert secret not in text
    assert "alice" in text and "proxy.example:3128" in text and "visible" in text


def test_proxy_credentials_from_url_or_settings() -> None:
    from_url = RemoteSettings(url=URL, proxy_url="http://bob:p%40ss@proxy:3128")
    assert from_url.proxy_credentials() == ("bob", "p@ss")
    explicit = RemoteSettings(
        url=URL, proxy_url="http://proxy:3128", proxy_username="u", proxy_password="p"
    )
    assert explicit.proxy_credentials() == ("u", "p")
    assert RemoteSettings(url=URL).proxy_credentials() is None


def test_credentials_in_the_url_become_username_and_password() -> None:
    """``http://user:password@host/...`` (percent-encoded as a url must be): the url loses
    them, so the catalog's urls, logs and repr never hold them; they are sent as the
    ``username``/``password`` settings are."""
    remote = RemoteSettings(url="https://alice:p%40ss%3Aw%2F@mirror.example/repo/PULP_MANIFEST")
    assert remote.url == "https://mirror.example/repo/PULP_MANIFEST"
    assert (remote.username, remote.password) == ("alice", "p@ss:w/")
    assert "p@ss" not in repr(remote) and "p%40ss" not in repr(remote)
    token = RemoteSettings(url="https://t0ken@mirror.example/m")  # a token as the user
    assert (token.url, token.username, token.password) == ("https://mirror.example/m", "t0ken", "")
    with pytest.raises(SettingsError, match="^url: .*give the credentials once"):
        RemoteSettings(url="https://a:b@mirror.example/m", username="c", password="d")
    with pytest.raises(SettingsError, match="^url: holds a password without a user name"):
        RemoteSettings(url="https://:secret@mirror.example/m")


def test_remote_subclass_is_validated_too(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="^ca_cert: "):
        Remote(name="r", url=URL, ca_cert=str(tmp_path / "nope.pem"))
    with pytest.raises(SettingsError, match="^download_concurrency: "):
        Remote(name="r", url=URL, download_concurrency=0)


def test_header_injection_refused() -> None:
    assert settings_error(headers={"X-A": "a\r\nInjected: 1"}).setting == "headers"
