"""Configuration loading: defaults, the shipped example, relative paths, and clear errors."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import trustme

from streamer.config import CONFIG_ENV, DEFAULT_LISTEN, ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]

REMOTE = '[[remotes]]\nname = "fx"\nurl = "http://127.0.0.1:1/PULP_MANIFEST"\n'


def write(tmp_path: Path, text: str, name: str = "streamer.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_shipped_configuration_loads_with_documented_defaults():
    config = load_config(REPO / "conf" / "streamer.toml", environ={})
    assert config.server.listen == DEFAULT_LISTEN
    assert config.server.grace_period == 30.0
    assert config.server.request_header_timeout == 30.0
    assert config.server.max_connections_per_client == 0
    assert config.storage.path == str(REPO / "conf" / "var")
    assert config.catalog_location() == str(REPO / "conf" / "var" / "catalog.sqlite3")
    assert config.catalog.pool_size == 4
    assert config.remotes == []
    assert config.security.signing_key() is None


def test_no_configuration_uses_embedded_defaults_in_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(None, environ={})
    assert config.source is None
    assert config.server.listen == "tcp:8080:interface=127.0.0.1"
    assert config.storage.path == str(tmp_path / "var")
    assert config.catalog_location() == str(tmp_path / "var" / "catalog.sqlite3")


def test_environment_names_the_file_and_paths_are_relative_to_it(tmp_path, monkeypatch):
    folder = tmp_path / "etc"
    folder.mkdir()
    path = write(
        folder,
        '[storage]\npath = "data"\n[catalog]\nurl = "sqlite:///db/cat.sqlite3"\n'
        '[security]\nallowed_import_paths = ["upstream", "/srv/abs"]\n'
        + REMOTE
        + 'ca_cert = "ca.pem"\n',
    )
    trustme.CA().cert_pem.write_to_path(str(folder / "ca.pem"))
    monkeypatch.chdir(tmp_path)
    config = load_config(None, environ={CONFIG_ENV: str(path)})
    assert config.source == str(path)
    assert config.storage.path == str(folder / "data")
    assert config.catalog_location() == str(folder / "db" / "cat.sqlite3")
    assert config.security.allowed_import_paths == (str(folder / "upstream"), "/srv/abs")
    (remote,) = config.remotes
    assert remote.ca_cert == str(folder / "ca.pem")
    # [security] allowed_import_paths flows into every remote.
    assert remote.allowed_import_paths == config.security.allowed_import_paths
    assert remote.base_path == "fx" and remote.policy == "on_demand"


def test_explicit_path_wins_over_environment_and_overrides_win_over_file(tmp_path):
    path = write(tmp_path, '[server]\nlisten = "tcp:9000"\ngrace_period = 5\n')
    config = load_config(
        path,
        {"server.listen": "unix:" + str(tmp_path / "s.sock"), "server.grace_period": None},
        environ={CONFIG_ENV: str(tmp_path / "missing.toml")},
    )
    assert config.server.listen == "unix:" + str(tmp_path / "s.sock")
    assert config.server.grace_period == 5.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server]\nlisten_on = 1\n", "server.listen_on: unknown key"),
        ('[server]\nlisten = "tcp:abc"\n', "server.listen: invalid endpoint 'tcp:abc'"),
        ("[server]\ngrace_period = -1\n", "server.grace_period: must be >= 0"),
        ('[server]\ngrace_period = "soon"\n', "server.grace_period: must be a number"),
        ("[server]\naccess_log_json = true\n", "server.access_log_json: needs server.access_log"),
        (
            "[server]\nrequest_header_timeout = -1\n",
            "server.request_header_timeout: must be a finite number >= 0, not -1.0",
        ),
        (
            "[server]\nrequest_header_timeout = inf\n",
            "server.request_header_timeout: must be a finite number >= 0, not inf",
        ),
        (
            '[server]\nrequest_header_timeout = "30s"\n',
            "server.request_header_timeout: must be a number",
        ),
        (
            "[server]\nmax_connections_per_client = 2.5\n",
            "server.max_connections_per_client: must be an integer",
        ),
        (
            "[server]\nmax_connections_per_client = -1\n",
            "server.max_connections_per_client: must be >= 0",
        ),
        ('[stroage]\npath = "x"\n', "stroage: unknown section"),
        ('[catalog]\nurl = "mysql://db"\n', "catalog.url: expected sqlite:///path"),
        ('[catalog]\nurl = "sqlite://db/c"\n', "catalog.url: expected sqlite:///path (three"),
        ('[catalog]\nurl = "sqlite:///"\n', "catalog.url: the SQLite file path is empty"),
        (
            '[catalog]\nurl = "postgresql://u:pw-secret@db:54x/c"\n',
            "catalog.url: catalog url postgresql://u@db:54x/c: bad port '54x'",
        ),
        (
            '[catalog]\nurl = "postgresql://db/c?sslmod=require"\n',
            'catalog.url: catalog url postgresql://db/c: invalid URI query parameter: "sslmod"',
        ),
        ("[catalog]\npool_size = 0\n", "catalog.pool_size: must be >= 1, not 0"),
        (REMOTE + 'policy = "lazy"\n', "remotes[0].policy: must be one of immediate"),
        (REMOTE + 'base_path = "metrics"\n', "remotes[0].base_path: /metrics is reserved"),
        (REMOTE + 'base_path = "healthz/x"\n', "remotes[0].base_path: /healthz is reserved"),
        (REMOTE + 'max_retries = "3"\n', "remotes[0].max_retries: must be an integer"),
        (REMOTE + "colour = 1\n", "remotes[0].colour: unknown key"),
        # A remote's private state is no key (was a TypeError's traceback; listed as known).
        (REMOTE + "_factory = 1\n", "remotes[0]._factory: unknown key"),
        (REMOTE + '_importer = "x"\n', "remotes[0]._importer: unknown key (known keys: allow_"),
        # NaN passed `value < 0` (then an AssertionError of Twisted's at the first request).
        (REMOTE + "connect_timeout = nan\n", "remotes[0].connect_timeout: must be a number >= 0"),
        (REMOTE + "sock_read_timeout = nan\n", "remotes[0].sock_read_timeout: must be a number"),
        (REMOTE + "rate_limit = nan\n", "remotes[0].rate_limit: must be a number >= 0, not nan"),
        ("[server]\ngrace_period = nan\n", "server.grace_period: must be >= 0, not nan"),
        # Part of every served path (and of the command's lines): none a request may hold
        # (before: accepted, and the remote's files could never be asked for).
        (
            '[[remotes]]\nname = "a\\nb"\nurl = "http://h/m"\n',
            "remotes[0].name: contains a NUL or control character: 'a\\nb'",
        ),
        (REMOTE + 'base_path = "a\\tb"\n', "remotes[0].base_path: contains a NUL or control"),
        (REMOTE + 'base_path = "a\\\\b"\n', "remotes[0].base_path: contains a backslash"),
        ("[server]\nstall_timeout = nan\n", "server.stall_timeout: must be >= 0, not nan"),
        (REMOTE + "sync_processes = -1\n", "remotes[0].sync_processes: must be an integer"),
        (REMOTE + 'allowed_import_paths = ["/"]\n', "remotes[0].allowed_import_paths: not a"),
        (REMOTE + 'via = "me"\n', "remotes[0].via: not a per-remote key; the Via pseudonym"),
        ('[[remotes]]\nname = "fx"\n', "remotes[0].url: required"),
        (REMOTE + REMOTE, "remotes[1].name: 'fx' is already used by remotes[0]"),
        (
            REMOTE + '[[remotes]]\nname = "b"\nbase_path = "fx"\nurl = "http://h/m"\n',
            "remotes[1].base_path: 'fx' overlaps 'fx' of remotes[0]",
        ),
        ("[server\n", "invalid TOML"),
    ],
)
def test_bad_configuration_names_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), environ={})
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml", environ={})


def test_signing_key_is_read_and_checked(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_bytes(b"short\n")
    config = load_config(write(tmp_path, '[security]\nsigning_key_file = "key"\n'), environ={})
    with pytest.raises(ConfigError, match="security.signing_key_file: the key must be"):
        config.security.signing_key()
    key_file.write_bytes(b"0123456789abcdef0123456789abcdef\n")
    assert config.security.signing_key() == b"0123456789abcdef0123456789abcdef"
    os.unlink(key_file)
    with pytest.raises(ConfigError, match="security.signing_key_file: cannot read"):
        config.security.signing_key()


def test_repr_shows_no_secret(tmp_path):
    path = write(
        tmp_path,
        REMOTE
        + 'username = "u"\npassword = "hunter2-secret"\n'
        + 'proxy_url = "http://proxy-user:proxy-secret@127.0.0.1:3128"\n'
        + '[catalog]\nurl = "postgresql://db:pg-secret@127.0.0.1/streamer"\n',
    )
    config = load_config(path, environ={})
    shown = repr(config) + repr(config.remotes) + config.catalog_location()
    for secret in ("hunter2-secret", "proxy-secret", "pg-secret"):
        assert secret not in shown
    # The one redaction (downloaders.urls.redact_url) masks the whole userinfo: a user name
    # can be a token too.
    assert config.catalog_location() == "postgresql://***@127.0.0.1/streamer"


def test_listen_paths_are_relative_to_the_file_and_overrides_to_the_working_folder(
    tmp_path, monkeypatch
):
    folder = tmp_path / "etc"
    folder.mkdir()
    cert = trustme.CA().issue_cert("127.0.0.1")
    cert.private_key_pem.write_to_path(str(folder / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(folder / "cert.pem"))
    monkeypatch.chdir(tmp_path)
    path = write(
        folder,
        '[server]\nlisten = "ssl:8443:privateKey=key.pem:certKey=cert.pem:interface=127.0.0.1"\n',
    )
    config = load_config(path, environ={})
    assert config.server.listen == (
        f"ssl:8443:privateKey={folder / 'key.pem'}:certKey={folder / 'cert.pem'}"
        ":interface=127.0.0.1"
    )
    # A unix socket: the positional address, escaped colons kept escaped.
    (folder / "a.toml").write_text('[server]\nlisten = "unix:run/s\\\\:1.sock:mode=660"\n')
    config = load_config(folder / "a.toml", environ={})
    assert config.server.listen == f"unix:{folder / 'run' / 's'}\\:1.sock:mode=660"
    # --listen (an override) is relative to the working folder, like any command-line path.
    config = load_config(path, {"server.listen": "unix:s.sock"}, environ={})
    assert config.server.listen == f"unix:{tmp_path / 's.sock'}"
    # Other endpoint types are left alone.
    config = load_config(path, {"server.listen": "tcp:0:interface=127.0.0.1"}, environ={})
    assert config.server.listen == "tcp:0:interface=127.0.0.1"


def test_resolving_keeps_what_twisted_parses():
    from twisted.internet.endpoints import _parse

    from streamer.config import resolve_endpoint_paths

    description = "ssl:443:privateKey=k\\:ey.pem:certKey=/abs/c.pem:extraCertChain=ch=ain.pem"
    resolved = resolve_endpoint_paths(description, "/base")
    args, kwargs = _parse(resolved)
    assert args == ["ssl", "443"]
    assert kwargs == {
        "privateKey": "/base/k:ey.pem",
        "certKey": "/abs/c.pem",
        "extraCertChain": "/base/ch=ain.pem",
    }


def test_every_remote_names_this_installation_in_its_via_entry(tmp_path):
    """One pseudonym per host and storage folder: the same in every process and command of
    a service (each loads the same file), another for another folder; no path in it."""
    path = write(tmp_path, '[storage]\npath = "var"\n' + REMOTE + REMOTE.replace("fx", "fy"))
    config = load_config(path)
    names = {remote.via for remote in config.remotes}
    assert len(names) == 1
    (name,) = names
    assert re.fullmatch(r"twisted-streamer-[0-9a-f]{12}", name)
    assert {r.via for r in load_config(path).remotes} == names
    assert {
        r.via for r in load_config(path, {"storage.path": str(tmp_path / "var")}).remotes
    } == names
    other = load_config(path, {"storage.path": str(tmp_path / "elsewhere")})
    assert {r.via for r in other.remotes} != names
