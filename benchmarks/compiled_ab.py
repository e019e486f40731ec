"""A/B: the publish hot path compiled (Cython or mypyc) against the same tree in pure Python.

    python -m benchmarks.compiled_ab [--tree DIR] [--tool cython|mypyc] [--pairs 3]
        [--e2e-pairs 3] [--work DIR] [--tests]

Copies ``--tree`` (default: this checkout, as it is on disk) twice into ``--work``
(default: a new temporary directory), compiles the hot-path modules (``MODULES``)
in place in one copy (a module that does not compile is left in Python and
reported), checks in a fresh interpreter that the compiled copy imports the
extension modules and the other copy the ``.py`` files, then runs
``benchmarks.micro_publish`` (CPU µs per message, "in" and "out") in both trees,
alternating, ``--pairs`` times per shape; with ``--e2e-pairs`` also
``benchmarks.profile_mqtt publish --qos 1 --rate 20000`` with ``--tree`` on each
(gateway CPU µs/msg, PUBACK p50/p99), alternating.  ``--tests`` runs a few unit
test files in the compiled tree first (do the compiled modules behave the same).

Cython compiles the modules unchanged (pure-Python mode, annotations used as
types where Cython understands them); mypyc compiles them as one group with the
project's strict mypy settings, less ``MYPYC_SKIP`` and with ``MYPYC_PATCHES``
applied to the copy.  ``--modules`` compiles a subset (e.g. the codec alone).
Needs ``cython`` (or mypy's ``mypyc``) and a C compiler; neither is a dependency
of the gateway.  Prints one JSON line per
measurement and a summary.  Speed belongs here, never in a test.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# The modules a QoS 1 PUBLISH and its PUBACK run through in `lastmile serve`
# (spool `kafka` mode): read and decode, session, route, buffer, produce, reports, ack.
MODULES = [
    "gateway/protocols/mqtt/codec.py",
    "gateway/protocols/mqtt/encode.py",
    "gateway/protocols/mqtt/events.py",
    "gateway/protocols/mqtt/packets.py",
    "gateway/protocols/mqtt/properties.py",
    "gateway/protocols/mqtt/session.py",
    "gateway/protocols/mqtt/wire.py",
    "gateway/protocols/mqtt/store.py",
    "gateway/sources/mqtt_server.py",
    "gateway/pipeline.py",
    "gateway/routing/router.py",
    "gateway/routing/compile.py",
    "gateway/routing/templates.py",
    "gateway/routing/trie.py",
    "gateway/routing/mqtt_headers.py",
    "gateway/buffer/priority.py",
    "gateway/buffer/spooled.py",
    "gateway/buffer/spool.py",
    "gateway/buffer/spool_replay.py",
    "gateway/buffer/flow.py",
    "gateway/buffer/sink.py",
    "gateway/sinks/kafka.py",
    "gateway/model.py",
    "gateway/observability/latency.py",
]
COPY = ["gateway", "benchmarks", "bridge-rules", "config", "tests"]
# --tests: the unit tests of the compiled modules (no broker, no network).
UNIT_TESTS = [
    "tests/unit/test_mqtt_codec.py", "tests/unit/test_mqtt_session.py",
    "tests/unit/test_mqtt_conformance.py", "tests/unit/test_routing_cache.py",
    "tests/unit/test_routing_trie.py", "tests/unit/test_spool_buffer.py",
    "tests/unit/test_spool_order.py", "tests/unit/test_kafka_sink_counts.py",
    "tests/unit/test_buffer_structure.py", "tests/unit/test_mqtt_headers.py",
]
# mypyc: modules it cannot build unchanged, and why.
MYPYC_SKIP = {
    "gateway/buffer/spool.py": "the attribute `_thread` becomes the C struct field `__thread`, "
                               "a GCC keyword: the generated C does not compile (a mypyc bug)",
    # msgspec Structs: the compiled class statement loses its keywords (kw_only=True),
    # import fails ("Required field 'topic' cannot follow optional fields").
    "gateway/protocols/mqtt/packets.py": "msgspec.Struct class keywords (kw_only) are lost",
    "gateway/protocols/mqtt/events.py": "msgspec.Struct class keywords (kw_only) are lost",
}
# mypyc: edits to the copy without which the compiled gateway does not run (mypyc checks
# every declared type at run time; the stubs and the libraries disagree here).
MYPYC_PATCHES = [
    # typeshed: Server.sockets is a tuple; uvloop's is a list ("tuple object expected").
    ("gateway/sources/mqtt_server.py", "server = await loop.create_server(",
     "server: Any = await loop.create_server("),
]
# micro_publish shapes: (PUBLISHes per read, reports per poll, qos).
SHAPES = [(1, 20, 1), (20, 200, 1), (1, 20, 0), (20, 200, 0)]


def copy_tree(src: Path, dst: Path) -> None:
    """The tree without pyproject.toml: the venv's setuptools, which builds the extensions,
    may be older than the one the project's metadata needs (add_pyproject, after)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.c", "build", "*.pyc")
    dst.mkdir(parents=True)
    for name in COPY:
        shutil.copytree(src / name, dst / name, ignore=ignore)


def add_pyproject(src: Path, dst: Path) -> None:
    """The test settings (pytest's asyncio mode) for --tests."""
    shutil.copy2(src / "pyproject.toml", dst / "pyproject.toml")


def _env(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree)}


def compile_cython(tree: Path, modules: list[str], jobs: int, directives: str
                   ) -> dict[str, str]:
    """cythonize -i each module in place; {module: "ok" | the error's last lines}."""
    extra = ["-X", directives] if directives else []

    def one(mod: str) -> tuple[str, str]:
        p = subprocess.run(
            [sys.executable, "-m", "Cython.Build.Cythonize", "-i", "-3", "-q", *extra, mod],
            cwd=tree, env=_env(tree), capture_output=True, text=True)
        if p.returncode == 0 and list((tree / mod).parent.glob(Path(mod).stem + ".*.so")):
            return mod, "ok"
        err = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
        return mod, "\n".join(err[-6:]) or f"exit {p.returncode}"
    with ThreadPoolExecutor(jobs) as ex:
        return dict(ex.map(one, modules))


def compile_mypyc(tree: Path, modules: list[str]) -> dict[str, str]:
    """mypyc the modules as one group; a module mypyc refuses is dropped and the rest retried."""
    mypyc = Path(sys.executable).parent / "mypyc"
    status = {m: MYPYC_SKIP[m] for m in modules if m in MYPYC_SKIP}
    for path, old, new in MYPYC_PATCHES:
        if path not in modules:
            continue
        f = tree / path
        text = f.read_text()
        if text.count(old) != 1:
            raise SystemExit(f"mypyc patch no longer applies to {path}: {old!r}")
        f.write_text(text.replace(old, new))
    todo = [m for m in modules if m not in status]
    while todo:
        p = subprocess.run([str(mypyc), *todo], cwd=tree, env=_env(tree),
                           capture_output=True, text=True)
        if p.returncode == 0:
            status.update((m, "ok") for m in todo)
            break
        out = p.stdout + p.stderr
        bad = {m for m in todo if re.search(rf"^{re.escape(m)}:\d+: error", out, re.M)}
        if not bad:  # a failure not tied to one module: give up on the rest
            tail = "\n".join(out.strip().splitlines()[-6:])
            status.update((m, tail) for m in todo)
            break
        for m in bad:
            lines = [ln for ln in out.splitlines() if ln.startswith(m + ":")]
            status[m] = "\n".join(lines[:3])
        todo = [m for m in todo if m not in bad]
    shutil.rmtree(tree / "build", ignore_errors=True)
    return status


def imported_files(tree: Path, modules: list[str]) -> dict[str, str]:
    """What a fresh interpreter with PYTHONPATH=tree imports for each module (its file name)."""
    names = [m.removesuffix(".py").replace("/", ".") for m in modules]
    code = ("import importlib, json, sys\n"
            f"print(json.dumps({{n: importlib.import_module(n).__file__ for n in {names!r}}}))")
    p = subprocess.run([sys.executable, "-c", code], cwd=tree, env=_env(tree),
                       capture_output=True, text=True, check=True)
    files: dict[str, str] = json.loads(p.stdout)
    return {m: files[n] for m, n in zip(modules, names, strict=True)}


def verify(tree: Path, modules: list[str], compiled: bool) -> None:
    for mod, f in imported_files(tree, modules).items():
        if not f.startswith(str(tree)):
            raise SystemExit(f"{mod}: imported from {f}, not from {tree}")
        if compiled != f.endswith(".so"):
            raise SystemExit(f"{mod}: imported {f} ({'not ' if compiled else ''}expected .so)")


MICRO = re.compile(r"best ([\d.]+) \(in ([\d.]+) \+ out ([\d.]+)\)")


def micro(tree: Path, per_read: int, per_poll: int, qos: int, a: argparse.Namespace
          ) -> dict[str, Any]:
    p = subprocess.run(
        [sys.executable, "-m", "benchmarks.micro_publish", "--per-read", str(per_read),
         "--per-poll", str(per_poll), "--qos", str(qos), "--repeat", str(a.repeat),
         "--messages", str(a.messages)],
        cwd=tree, env=_env(tree), capture_output=True, text=True)
    m = MICRO.search(p.stdout)
    if p.returncode or not m:
        raise SystemExit(f"micro_publish failed in {tree}:\n{p.stdout}{p.stderr[-3000:]}")
    return {"in": float(m[2]), "out": float(m[3]), "total": float(m[1])}


def e2e(tree: Path, a: argparse.Namespace) -> dict[str, Any]:
    p = subprocess.run(
        [sys.executable, "-m", "benchmarks.profile_mqtt", "publish", "--qos", "1",
         "--rate", str(a.rate), "--procs", "2", "--duration", str(a.duration),
         "--tree", str(tree)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode or not lines:
        raise SystemExit(f"profile_mqtt failed for {tree}:\n{p.stdout}{p.stderr[-3000:]}")
    res: dict[str, Any] = json.loads(lines[-1])
    pub = res.get("puback_ms") or {}
    return {"cpu_us": res.get("gateway_cpu_us_per_msg"), "acked_per_s": res.get("acked_per_s"),
            "p50_ms": pub.get("p50"), "p99_ms": pub.get("p99"),
            "errors": res.get("errors"), "log_events": res.get("log_events")}


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def emit(kind: str, tree: str, **fields: Any) -> dict[str, Any]:
    row = {"kind": kind, "tree": tree, "load": load(), **fields}
    print(json.dumps(row), flush=True)
    return row


def alternate(pairs: int, run: Any, trees: dict[str, Path]) -> list[dict[str, Any]]:
    """Pairs in ABBA order (so neither tree always runs first)."""
    rows = []
    for i in range(pairs):
        order = ["python", "compiled"] if i % 2 == 0 else ["compiled", "python"]
        for name in order:
            rows.append(run(name, trees[name]) | {"pair": i + 1})
    return rows


def summary(rows: list[dict[str, Any]], key: str) -> str:
    by: dict[str, list[float]] = {}
    for r in rows:
        if r.get(key) is not None:
            by.setdefault(r["tree"], []).append(float(r[key]))
    parts = [f"{t} mean {statistics.mean(v):.2f} [{min(v):.2f}-{max(v):.2f}]"
             for t, v in sorted(by.items())]
    if {"python", "compiled"} <= by.keys():
        py, co = statistics.mean(by["python"]), statistics.mean(by["compiled"])
        parts.append(f"change {100 * (co - py) / py:+.1f} %")
    return f"{key}: " + "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.compiled_ab", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", default=str(ROOT), help="source tree to copy (as on disk)")
    ap.add_argument("--tool", choices=["cython", "mypyc"], default="cython")
    ap.add_argument("--directives", default="",
                    help="cython: compiler directives, e.g. binding=False,annotation_typing=False")
    ap.add_argument("--modules", default=None,
                    help="comma-separated paths to compile instead of MODULES")
    ap.add_argument("--tag", default=None, help="name of the compiled tree (default: the tool)")
    ap.add_argument("--work", default=None, help="reuse or keep the two trees here")
    ap.add_argument("--jobs", type=int, default=2, help="cython: modules compiled at once")
    ap.add_argument("--pairs", type=int, default=3, help="micro_publish pairs per shape")
    ap.add_argument("--messages", type=int, default=50_000)
    ap.add_argument("--repeat", type=int, default=4)
    ap.add_argument("--shapes", default="all", help="'all' or e.g. 1:20:1,20:200:1 "
                    "(per-read:per-poll:qos)")
    ap.add_argument("--e2e-pairs", type=int, default=0, help="profile_mqtt pairs (0: none)")
    ap.add_argument("--rate", type=int, default=20_000)
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--tests", action="store_true", help="run unit tests in the compiled tree")
    a = ap.parse_args(argv)
    if a.tool == "cython" and importlib.util.find_spec("Cython") is None:
        ap.error("Cython is not installed here (pip install cython)")
    if a.tool == "mypyc" and not (Path(sys.executable).parent / "mypyc").exists():
        ap.error("mypyc is not next to this Python (pip install mypy)")
    modules = a.modules.split(",") if a.modules else MODULES
    for m in modules:
        if not (Path(a.tree) / m).is_file():
            ap.error(f"--modules: no such file in {a.tree}: {m}")
    shapes = SHAPES if a.shapes == "all" else [
        tuple(int(x) for x in s.split(":")) for s in a.shapes.split(",")]

    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="lm-compiled-ab-"))
    tag = a.tag or a.tool
    trees = {"python": work / "python", "compiled": work / f"compiled-{tag}"}
    status_file = trees["compiled"] / ".compiled.json"
    if not trees["python"].exists():
        copy_tree(Path(a.tree), trees["python"])
        add_pyproject(Path(a.tree), trees["python"])
    if status_file.exists():
        status = json.loads(status_file.read_text())
        print(f"reusing {trees['compiled']}", file=sys.stderr)
    else:
        shutil.rmtree(trees["compiled"], ignore_errors=True)
        copy_tree(Path(a.tree), trees["compiled"])
        t0 = time.monotonic()
        status = (compile_cython(trees["compiled"], modules, a.jobs, a.directives)
                  if a.tool == "cython"
                  else compile_mypyc(trees["compiled"], modules))
        print(f"compiled in {time.monotonic() - t0:.0f} s", file=sys.stderr)
        add_pyproject(Path(a.tree), trees["compiled"])
        status_file.write_text(json.dumps(status))
    done = [m for m, s in status.items() if s == "ok"]
    for m, s in status.items():
        if s != "ok":
            print(f"NOT compiled: {m}:\n  " + s.replace("\n", "\n  "), file=sys.stderr)
    verify(trees["compiled"], done, compiled=True)
    verify(trees["python"], MODULES, compiled=False)
    emit("build", f"compiled-{tag}", directives=a.directives, compiled=done,
         failed=sorted(m for m, s in status.items() if s != "ok"), work=str(work))

    if a.tests:
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            *UNIT_TESTS], cwd=trees["compiled"], env=_env(trees["compiled"]),
                           capture_output=True, text=True)
        tail = p.stdout.strip().splitlines()[-15:]
        emit("tests", "compiled", exit=p.returncode, tail=tail)

    all_rows: list[dict[str, Any]] = []
    for per_read, per_poll, qos in shapes if a.pairs else []:
        def run_micro(name: str, tree: Path, pr: int = per_read, pp: int = per_poll,
                      q: int = qos) -> dict[str, Any]:
            return emit("micro", name, per_read=pr, per_poll=pp, qos=q,
                        **micro(tree, pr, pp, q, a))
        rows = alternate(a.pairs, run_micro, trees)
        all_rows += rows
        print(f"# micro per_read={per_read} per_poll={per_poll} qos={qos}: "
              + summary(rows, "total") + " | " + summary(rows, "in") + " | "
              + summary(rows, "out"), flush=True)
    if a.e2e_pairs:
        def run_e2e(name: str, tree: Path) -> dict[str, Any]:
            return emit("e2e", name, rate=a.rate, **e2e(tree, a))
        rows = alternate(a.e2e_pairs, run_e2e, trees)
        print("# e2e: " + summary(rows, "cpu_us") + " | " + summary(rows, "p50_ms") + " | "
              + summary(rows, "p99_ms"), flush=True)
    if not a.work:
        print(f"trees kept in {work} (rm -rf it when done)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
