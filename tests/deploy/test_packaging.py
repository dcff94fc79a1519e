"""The runtime core and the services install and start without the tools only people run.

shared/kiban is what every worker image installs; the CLI (kiban_cli, the "cli" extra) and
the model export tool (kiban_export, the "export" extra, torch) live in packages of their own.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from tests.conftest import REPO_ROOT

SHARED = REPO_ROOT / "shared" / "kiban"
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())

# What a worker process imports: the core, the Celery app and every service's tasks.
WORKER_IMPORTS = (
    "kiban.worker",
    "kiban.celery_app",
    "kiban.tasks",
    "kiban.messages",
    "kiban_encoder.tasks",
    "kiban_ingest.tasks",
    "kiban_reporter.tasks",
    "kiban_trainer.tasks",
)
# What no worker may load: the CLI's dependencies, torch and the tools' packages.
TOOLS_ONLY = ("typer", "rich", "torch", "open_clip", "kiban_cli", "kiban_export")


def _loaded_after(imports: tuple[str, ...], watched: tuple[str, ...]) -> list[str]:
    """The ``watched`` top-level modules in sys.modules after importing ``imports`` afresh."""
    code = (
        "import importlib, sys\n"
        f"for name in {list(imports)!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(','.join(m for m in {list(watched)!r} if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    return [m for m in out.stdout.strip().split(",") if m]


def test_workers_import_none_of_the_tools() -> None:
    assert _loaded_after(WORKER_IMPORTS, TOOLS_ONLY) == []


def test_the_reporter_does_not_load_pillow() -> None:
    """Pillow is in the ingest and encoder extras only; the reporter image has none."""
    imports = ("kiban.worker", "kiban.celery_app", "kiban.tasks", "kiban_reporter.tasks")
    assert _loaded_after(imports, ("PIL", *TOOLS_ONLY)) == []


def test_shared_holds_only_the_runtime_core() -> None:
    for moved in ("cli", "export", "stack.py", "synthetic.py"):
        assert not (SHARED / moved).exists(), f"shared/kiban/{moved} belongs to a tool package"
    assert (REPO_ROOT / "tools" / "cli" / "kiban_cli" / "main.py").is_file()
    assert (REPO_ROOT / "services" / "trainer" / "kiban_export" / "__init__.py").is_file()


def test_no_core_module_imports_a_tool_package() -> None:
    pattern = re.compile(r"^\s*(from|import)\s+(kiban_cli|kiban_export|typer|rich|torch)\b", re.M)
    offenders = [
        str(path.relative_to(REPO_ROOT))
        for path in SHARED.rglob("*.py")
        if pattern.search(path.read_text()) and path.name != "console.py"
    ]
    assert offenders == []  # console.py: the `kiban` script's guarded import, tested below


def test_kiban_script_without_the_cli_extra_says_what_to_install() -> None:
    code = (
        "import sys; sys.modules['kiban_cli'] = None; sys.modules['kiban_cli.main'] = None; "
        "from kiban.console import main; main()"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "pip install 'kiban[cli]'" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


# -- pyproject.toml -----------------------------------------------------------------------


def _name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def _self_extras(requirement: str) -> list[str]:
    match = re.fullmatch(r"\s*kiban\[([^\]]+)\]\s*", requirement)
    return [e.strip() for e in match.group(1).split(",")] if match else []


def resolve_extra(extra: str | None) -> set[str]:
    """Distribution names an install of ``kiban[extra]`` asks for (core + extra, recursively,
    not the dependencies' own dependencies)."""
    project = PYPROJECT["project"]
    names = {_name(r) for r in project["dependencies"]}
    pending, seen = [extra] if extra else [], set()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        for requirement in project["optional-dependencies"][current]:
            nested = _self_extras(requirement)
            if nested:
                pending.extend(nested)
            else:
                names.add(_name(requirement))
    return names


HEAVY_OR_CLI = {"torch", "torchvision", "open-clip-torch", "timm", "onnx", "typer", "rich"}


def test_core_dependencies_are_only_the_runtime_core() -> None:
    assert resolve_extra(None) == {
        "pydantic",
        "pydantic-settings",
        "numpy",
        "celery",
        "redis",
        "boto3",
        "qdrant-client",
        "prometheus-client",
    }


@pytest.mark.parametrize("extra", ["ingest", "encoder", "reporter"])
def test_service_extras_have_no_torch_and_no_cli(extra: str) -> None:
    assert resolve_extra(extra) & HEAVY_OR_CLI == set()


def test_encoder_extra() -> None:
    names = resolve_extra("encoder")
    assert {"onnxruntime-gpu", "onnxruntime", "pillow"} <= names
    assert not names & {"torch", "typer", "rich"}


def test_cli_export_and_dev_extras() -> None:
    assert resolve_extra("cli") - resolve_extra(None) == {"typer", "rich"}
    assert "torch" in resolve_extra("export") and "typer" not in resolve_extra("export")
    assert {"typer", "rich", "torch", "onnxruntime", "scipy", "pillow"} <= resolve_extra("dev")


def test_entry_points_and_package_roots() -> None:
    assert PYPROJECT["project"]["scripts"] == {
        "kiban": "kiban.console:main",
        "kiban-worker": "kiban.worker:main",
    }
    roots = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["where"]
    assert {"shared", "services/trainer", "tools/cli"} <= set(roots)
    assert all((REPO_ROOT / root).is_dir() for root in roots)


# -- the worker entry point ---------------------------------------------------------------


def _worker(
    *args: str, home: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``python -m kiban.worker ARGS`` with typer and rich unimportable (as in a worker image)."""
    code = (
        "import sys\n"
        "sys.modules.update(typer=None, rich=None)  # import typer/rich -> ImportError\n"
        "from kiban.worker import main\n"
        "sys.argv[0] = 'kiban.worker'\n"
        f"main({list(args)!r})\n"
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith("KIBAN_")}
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**base, "KIBAN_HOME": str(home), **(env or {})},
    )


def test_worker_help_needs_no_cli_dependencies(tmp_path: Path) -> None:
    result = _worker("--help", home=tmp_path)
    assert result.returncode == 0, result.stderr
    for service in ("ingest", "encoder", "indexer", "reporter", "beat"):
        assert service in result.stdout
    assert "--queues" in result.stdout and "--metrics-port" in result.stdout


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (("nosuch",), {}, "nosuch"),
        (("encoder", "--concurrency", "0"), {}, "--concurrency"),
        (("encoder", "--metrics-port", "x"), {}, "--metrics-port"),
        (("ingest",), {"KIBAN_CHUNK_SIZE": "many"}, "KIBAN_CHUNK_SIZE"),
        (("ingest",), {}, "KIBAN_MODE"),
        (("reporter",), {"KIBAN_MODE": "distributed"}, "KIBAN_QDRANT_URL"),
    ],
)
def test_worker_refuses_in_one_line(
    tmp_path: Path, args: tuple[str, ...], env: dict[str, str], named: str
) -> None:
    result = _worker(*args, home=tmp_path / "home", env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert named in lines[0] and lines[0].startswith("kiban-worker: error:")


def test_worker_parser_reads_the_chart_style_command_line() -> None:
    from kiban.worker import build_parser

    parsed = build_parser().parse_args(
        ["encoder", "--queues", "encode.gpu,encode", "--concurrency", "2", "--metrics-port", "9100"]
    )
    assert parsed.service == "encoder"
    assert parsed.queues == ["encode.gpu", "encode"]
    assert (parsed.concurrency, parsed.metrics_port) == (2, 9100)
    defaults = build_parser().parse_args(["beat"])
    assert (defaults.queues, defaults.concurrency, defaults.metrics_port) == (None, 1, None)


def test_local_stack_spawns_workers_with_the_worker_entry_point(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from kiban_cli import stack

    spawned: list[list[str]] = []
    monkeypatch.setattr(stack, "spawn", lambda name, args, *rest, **kw: spawned.append(args))
    stack.LocalStack(tmp_path).start_worker("encoder", "encoder-0", "--concurrency", "2")
    assert spawned == [[sys.executable, "-m", "kiban.worker", "encoder", "--concurrency", "2"]]


def test_kiban_worker_in_the_cli_still_refuses_cleanly() -> None:
    from typer.testing import CliRunner

    from kiban_cli.main import app

    result = CliRunner().invoke(app, ["worker", "nosuch"])
    assert result.exit_code == 2
    result = CliRunner().invoke(app, ["worker", "ingest"])  # embedded mode: refused
    assert result.exit_code == 2
    assert "KIBAN_MODE=distributed" in result.output
