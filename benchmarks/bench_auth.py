"""Connect rate with authentication: anonymous, password file, JWT; Lastmile and Mosquitto.

    python -m benchmarks.bench_auth [--connections 10000]

Every connection is a different device with its own credentials (a cold start:
nothing cached), as after a gateway restart or a cell coming back:

- password: one ``$7$`` line per device (PBKDF2-SHA512, 101 iterations: what
  ``mosquitto_passwd`` writes), the same file for Lastmile and Mosquitto;
- JWT: one ES256 token per device (``sub`` = its username), keys from a JWKS file
  (Lastmile only: Mosquitto has no JWT support).

Same load generator (``benchmarks/loadgen.py connect``) against each, one run.
Writes ``benchmarks/results/auth.json`` and re-renders ``docs/benchmarks.md``
(its "Authentication" section) from that and ``results/latest.json``.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.run import Scenario, run_loadgen, settle
from benchmarks.servers import Lastmile, Mosquitto, Server, StartError, Tansu

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def make_credentials(work: Path, n: int) -> tuple[Path, Path, Path, Path]:
    """Password file, its credentials list, JWKS file and the JWT credentials list."""
    import jwt
    from cryptography.hazmat.primitives.asymmetric import ec

    from gateway.auth.passwd import hash_password, write_atomically

    users = [(f"dev-{i}", secrets.token_urlsafe(12)) for i in range(n)]
    passwd = work / "passwd"
    write_atomically(passwd, [f"{u}:{hash_password(p.encode()).encode()}" for u, p in users])
    # Mosquitto started as root reads it as user "mosquitto" (it drops privileges).
    work.chmod(0o755)
    passwd.chmod(0o644)
    creds = work / "creds-password.tsv"
    creds.write_text("".join(f"{u}\t{p}\n" for u, p in users))
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="bench", use="sig", alg="ES256")
    jwks = work / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk]}))
    exp = int(time.time()) + 3600
    tokens = work / "creds-jwt.tsv"
    tokens.write_text("".join(
        f"{u}\t{jwt.encode({'sub': u, 'exp': exp}, key, 'ES256', headers={'kid': 'bench'})}\n"
        for u, _ in users))
    return passwd, creds, jwks, tokens


def connect(server: Server, n: int, credentials: Path | None) -> dict[str, Any]:
    args: dict[str, Any] = {"connections": n, "procs": 2, "source-ips": 2, "hold": 2.0}
    if credentials is not None:
        args["credentials"] = str(credentials)
    settle(server)
    return run_loadgen(Scenario("connect", "connect", args), server, 1, None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_auth", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M:%S %z")
    t0 = time.monotonic()
    out: dict[str, Any] = {"started": started, "connections": a.connections,
                           "workers": a.workers, "loadavg_start": report.loadavg(),
                           "results": {}}
    res = out["results"]
    with tempfile.TemporaryDirectory(prefix="lastmile-bench-auth-") as tmp:
        work = Path(tmp)
        passwd, pw_creds, jwks, jwt_creds = make_credentials(work, a.connections)
        for name, pfile, creds in (("anonymous", None, None), ("password", passwd, pw_creds)):
            sub = work / f"mosquitto-{name}"
            sub.mkdir()
            m = Mosquitto(sub)
            try:
                m.start(password_file=pfile)
                res[f"mosquitto/{name}"] = connect(m, a.connections, creds)
            except StartError as e:
                res[f"mosquitto/{name}"] = {"error": str(e)}
            finally:
                m.stop()
            print(f"mosquitto {name}: {report.one_line('idle', res[f'mosquitto/{name}'])}")
        lastmile_auth: dict[str, tuple[dict[str, Any], Path | None]] = {
            "anonymous": ({"allow_anonymous": True}, None),
            "password": ({"allow_anonymous": False, "password_file": str(passwd)}, pw_creds),
            "jwt": ({"allow_anonymous": False, "jwt": {"jwks_file": str(jwks)}}, jwt_creds),
        }
        for name, (auth, creds) in lastmile_auth.items():
            sub = work / f"lastmile-{name}"
            sub.mkdir()
            t, g = Tansu(sub), Lastmile(sub)
            try:
                t.start()
                g.start(t.bootstrap, a.workers, {"auth": auth})
                res[f"lastmile/{name}"] = connect(g, a.connections, creds)
            except StartError as e:
                res[f"lastmile/{name}"] = {"error": str(e)}
            finally:
                g.stop()
                t.stop()
            print(f"lastmile {name}: {report.one_line('idle', res[f'lastmile/{name}'])}")
    out["seconds"] = round(time.monotonic() - t0, 1)
    out["loadavg_end"] = report.loadavg()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "auth.json").write_text(json.dumps(out, indent=2) + "\n")
    latest = RESULTS / "latest.json"
    if latest.exists():
        data = json.loads(latest.read_text())
        (ROOT / "docs" / "benchmarks.md").write_text(report.markdown(data))
    print(f"wrote {RESULTS / 'auth.json'} in {out['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
