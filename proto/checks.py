"""Value checks that config sections run on themselves (`validate()` beside each dataclass). They raise
ValueError naming the field relative to its section; specdraft.config prefixes the section's path, so the
user reads one line such as `drafter.ngram.max_depth: must be > 0, got 0`."""

import glob
import os
import ssl
from pathlib import Path


def positive(section, *names: str) -> None:
    for name in names:
        if not getattr(section, name) > 0:  # (NaN fails too)
            raise ValueError(f"{name}: must be > 0, got {getattr(section, name)}")


def nonneg(section, *names: str) -> None:
    for name in names:
        if not getattr(section, name) >= 0:  # (NaN fails too)
            raise ValueError(f"{name}: must be >= 0, got {getattr(section, name)}")


def fraction(section, name: str, low_open: bool = False) -> None:
    """A value in [0, 1], or (0, 1] with low_open."""
    v = getattr(section, name)
    if not (0 < v <= 1 if low_open else 0 <= v <= 1):
        raise ValueError(f"{name}: must be in {'(0' if low_open else '[0'}, 1], got {v}")


def host_port(section, name: str) -> None:
    addr = getattr(section, name)
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{name}: {addr!r} is not host:port")


def file_in(folder, name: str, hint: str = "") -> None:
    """A checkpoint-style folder must hold `name` (drafter.safetensors, selector.safetensors)."""
    if not (Path(folder) / name).is_file():
        raise FileNotFoundError(f"{folder}: no {name}{f' ({hint})' if hint else ''}")


def conversation_source(section, name: str) -> None:
    """`sharegpt` (the packaged set), an existing .jsonl / .json file of conversations, or a glob of
    .jsonl shards that matches at least one file."""
    source = getattr(section, name)
    if source == "sharegpt":
        return
    if not source.endswith((".jsonl", ".json")):
        raise ValueError(f"{name}: {source!r} is neither sharegpt nor a .jsonl / .json file (or a glob of them)")
    if glob.has_magic(source):
        if not glob.glob(source):
            raise ValueError(f"{name}: {source}: no file matches")
        return
    existing_file(section, name)


def existing_file(section, name: str) -> None:
    path = getattr(section, name)
    if path and not Path(path).is_file():
        raise ValueError(f"{name}: {path}: file not found")


def pem_pair(section, cert_name: str, key_name: str) -> None:
    """A TLS certificate chain and its private key, both PEM, that belong together (when set)."""
    cert, key = getattr(section, cert_name), getattr(section, key_name)
    if not cert or not key:
        return
    if b"-----BEGIN CERTIFICATE-----" not in Path(cert).read_bytes():
        raise ValueError(f"{cert_name}: {cert}: no PEM certificate in it")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except ssl.SSLError as e:
        raise ValueError(
            f"{key_name}: {key}: not a PEM private key for the certificate {cert} ({e.reason or e})"
        ) from None


def env_token(var: str) -> str:
    """The shared-secret token held in environment variable `var` ("" when var is "" or unset)."""
    return os.environ.get(var, "") if var else ""


def token_set(section, name: str) -> None:
    var = getattr(section, name)
    if var and not env_token(var):
        raise ValueError(f"{name}: environment variable {var} is not set or empty")
