"""Server TLS for every listener a client reaches (mqtts, https/wss), with live reload.

A listener's server holds one SSLContext for its lifetime (``ServerTls.context``).
Its ``sni_callback`` runs at every ClientHello (with or without SNI) and hands the
handshake to the newest good context, so a reload is: build a complete new context
from the files, then make it current.  A file that does not load (half written,
wrong key, not PEM) never becomes current: the old certificate stays in use,
``tls_reload_failed`` says which file and why.  Connections already open keep the
certificate they were made with.

The files are polled (stat, following symlinks: a Kubernetes Secret's ``..data``
swap counts) every ``POLL_S`` seconds, and a change is loaded once two polls agree,
so an operator copying the certificate and then the key is not caught half way.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from gateway.auth import watch
from gateway.errors import ConfigError

if TYPE_CHECKING:
    from gateway.config.schema import TlsListener

log = structlog.get_logger("lastmile.tls")

POLL_S = 2.0
FILE_KEYS = ("certfile", "keyfile", "cafile")


@dataclass(frozen=True, slots=True)
class TlsFileError(Exception):
    """A TLS file that cannot serve: ``key`` is the listener key naming it."""

    key: str
    file: str
    reason: str

    def __str__(self) -> str:
        return f"{self.key} {self.file}: {self.reason}"


def _read(key: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise TlsFileError(key, path, f"cannot read: {exc.strerror}") from exc


def check_files(certfile: str, keyfile: str, cafile: str | None) -> dict[str, str]:
    """Parse the files and check the key belongs to the certificate; what it certifies.

    Gives a precise ``TlsFileError`` where OpenSSL only says "PEM lib".
    """
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    cert_pem = _read("certfile", certfile)
    key_pem = _read("keyfile", keyfile)
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError as exc:
        raise TlsFileError("certfile", certfile, "no PEM certificate in it") from exc
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError as exc:
        raise TlsFileError("keyfile", keyfile,
                           "the key is encrypted; give an unencrypted PEM key") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise TlsFileError("keyfile", keyfile, "no PEM private key in it") from exc
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != chain[0].public_key().public_bytes(*spki):
        raise TlsFileError("keyfile", keyfile,
                           f"does not match the certificate in {certfile}")
    if cafile:
        try:
            x509.load_pem_x509_certificates(_read("cafile", cafile))
        except ValueError as exc:
            raise TlsFileError("cafile", cafile, "no PEM certificate in it") from exc
    cert = chain[0]
    return {"subject": cert.subject.rfc4514_string(), "serial": f"{cert.serial_number:x}",
            "not_after": cert.not_valid_after_utc.isoformat()}


def build_context(listener: TlsListener) -> tuple[ssl.SSLContext, dict[str, str]]:
    """A complete server context from the listener's files (TLS 1.2 or newer).

    With ``cafile`` clients may present a certificate from it (required with
    ``require_client_cert``); its subject CN is the connection's certificate identity.
    """
    certfile, keyfile, cafile = listener.certfile, listener.keyfile, listener.cafile
    if not (certfile and keyfile):
        raise TlsFileError("certfile" if not certfile else "keyfile", "",
                           "certfile and keyfile are required")
    about = check_files(certfile, keyfile, cafile)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile, keyfile)
    except ssl.SSLError as exc:
        raise TlsFileError("certfile", certfile, f"OpenSSL refused it: {exc}") from exc
    if cafile:
        try:
            context.load_verify_locations(cafile)
        except ssl.SSLError as exc:
            raise TlsFileError("cafile", cafile, f"OpenSSL refused it: {exc}") from exc
        context.verify_mode = ssl.CERT_REQUIRED if listener.require_client_cert \
            else ssl.CERT_OPTIONAL
    elif listener.require_client_cert:
        raise TlsFileError("cafile", "", "require_client_cert needs a cafile")
    return context, about


Signature = tuple[watch.Signature, ...]


def _signature(paths: tuple[str, ...]) -> Signature:
    return tuple(watch.signature(path) for path in paths)


class ServerTls:
    """One TLS listener's context, kept current with its certificate files."""

    def __init__(self, listener: TlsListener, name: str) -> None:
        self.listener = listener
        self.name = name
        self.paths = tuple(p for p in (listener.certfile, listener.keyfile, listener.cafile)
                           if p)
        self._applied = _signature(self.paths)
        self._seen = self._applied
        self._failed: Signature | None = None
        try:  # load_config checked the files; they may have changed since
            self.current, self.about = build_context(listener)
        except TlsFileError as exc:
            raise ConfigError(f"{exc.file}: {exc.reason}",
                              key=f"listeners.{name}.{exc.key}") from exc
        # The context the server holds; every handshake is moved to ``current``.
        self.context = self.current
        self.context.sni_callback = self._on_hello
        self.reloads_ok = 0
        self.reloads_failed = 0
        self._task: asyncio.Task[None] | None = None

    def _on_hello(self, sslobj: ssl.SSLObject | ssl.SSLSocket, _server_name: str | None,
                  _context: ssl.SSLContext) -> None:
        current = self.current
        if sslobj.context is not current:
            sslobj.context = current

    def reload(self) -> bool:
        """Build a new context from the files; make it current if it loads."""
        try:
            context, about = build_context(self.listener)
        except TlsFileError as exc:
            self.reloads_failed += 1
            log.error("tls_reload_failed", listener=self.name, file=exc.file, key=exc.key,
                      error=exc.reason, keeping="the certificate in use")
            return False
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            self.reloads_failed += 1
            log.error("tls_reload_failed", listener=self.name, file=self.listener.certfile,
                      error=str(exc), keeping="the certificate in use")
            return False
        self.current, self.about = context, about
        self.reloads_ok += 1
        log.info("tls_reloaded", listener=self.name, certfile=self.listener.certfile,
                 keyfile=self.listener.keyfile, cafile=self.listener.cafile, **about)
        return True

    def poll(self) -> None:
        """One poll: load a change once it has held still for a poll interval."""
        sig = _signature(self.paths)
        settled = sig == self._seen
        self._seen = sig
        if not settled or sig == self._applied or sig == self._failed:
            return
        if self.reload():
            self._applied, self._failed = sig, None
        else:
            self._failed = sig  # retried when the files change again

    async def watch(self, interval: float = POLL_S) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                self.poll()
            except Exception:  # never let a reload bug end the watch
                log.exception("tls_watch_failed", listener=self.name)

    def start(self) -> None:
        self._task = asyncio.create_task(self.watch(), name=f"tls-watch-{self.name}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

