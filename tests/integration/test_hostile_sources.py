"""The hostile-source corpus (issue 9 §1, §3, §7): a source, manifest or message that a
hostile user would write never stops, hangs or escapes a batch.

Every case is one row of a table with its documented outcome — *quarantined* with a reason,
*accepted*, *absent* (never listed), or *refused* (the message fails for good, without reading
anything) — planted together with good images. The good images of each batch must still be
ingested (and, for the embedded pipeline case, encoded and scored), no run may hang, and
nothing outside the source may be read: a valid JPEG planted next to the source, the target
of every escaping link, must never appear in the batch.

file:// runs in a subprocess with a timeout (a FIFO that is opened hangs for ever). When the
tests run as root, chmod 000 is no bar, so that subprocess drops CAP_DAC_OVERRIDE with
``setpriv`` and the permission cases are real. The S3 side runs against SeaweedFS.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kiban.context import Context
from kiban.errors import ForbiddenLocationError
from kiban.messages import ExportReport, IngestBatch
from kiban.records import (
    BatchInfo,
    ImageRecord,
    QuarantineEntry,
    read_batch_info,
    read_quarantine,
    read_records,
)
from kiban.settings import Settings, use_settings
from kiban.store import open_store
from kiban_cli.synthetic import encode, generate_texture_dataset, sample_images
from kiban_ingest.ingest import ingest_batch
from kiban_ingest.labels import ManifestError

pytestmark = pytest.mark.integration

MAX_BYTES = 64 * 1024  # KIBAN_MAX_OBJECT_BYTES of these tests: the good images are far below
CLASSES = ["checker", "stripes_coarse", "stripes_fine"]
PER_CLASS = 6
ACCEPTED, QUARANTINED, ABSENT = "accepted", "quarantined", "absent"


def jpeg(seed: int) -> bytes:
    return encode(sample_images(1, seed=seed)[0], ".jpg")


def big_png() -> bytes:
    """A valid image, larger than MAX_BYTES (incompressible noise)."""
    pixels = np.random.default_rng(7).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    assert len(buf.getvalue()) > 2 * MAX_BYTES
    return buf.getvalue()


SECRET = jpeg(seed=4242)  # outside every source: would be *accepted* if it were ever read
SECRET_SHA = hashlib.sha256(SECRET).hexdigest()


def raw(source: Path, name: bytes) -> Path:
    """A path from raw bytes (a name that is not UTF-8), through surrogateescape."""
    return source / os.fsdecode(name)


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def link(path: Path, target: str | Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)


def unix_socket(path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX)
    cwd = Path.cwd()
    os.chdir(path.parent)  # AF_UNIX paths are limited to ~100 bytes: bind relative
    try:
        sock.bind(path.name)
    finally:
        os.chdir(cwd)
        sock.close()


def device(path: Path) -> None:
    os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # what /dev/zero is


def sparse(path: Path) -> None:
    with path.open("wb") as fh:
        fh.truncate(8 << 30)  # 8 GiB that cost no disk: read whole, it would take minutes


def locked_file(path: Path) -> None:
    write(path, jpeg(seed=77))
    path.chmod(0)


def locked_folder(path: Path) -> None:
    write(path / "inside.jpg", jpeg(seed=78))
    path.chmod(0)


@dataclass(frozen=True)
class Case:
    name: str
    key: str  # as the batch shows it (printable for names that are not text)
    expect: str  # accepted | quarantined | absent
    plant: Callable[[Path, Path], None]  # (source, outside folder)
    reason: str = ""  # a substring of the quarantine reason
    needs: str = ""  # "mknod" | "unprivileged": planted only where it means something


FILE_CASES = [
    Case(
        "symlink out of the source",
        "checker/out.jpg",
        QUARANTINED,
        lambda s, o: link(s / "checker/out.jpg", o / "secret.jpg"),
        "symbolic link to a path outside the source: not followed",
    ),
    Case(
        "relative symlink climbing out",
        "checker/climb.jpg",
        QUARANTINED,
        lambda s, o: link(s / "checker/climb.jpg", "../../outside/secret.jpg"),
        "outside the source",
    ),
    Case(
        "symlink to /etc/passwd",
        "checker/passwd.jpg",
        QUARANTINED,
        lambda s, o: link(s / "checker/passwd.jpg", "/etc/passwd"),
        "outside the source",
    ),
    Case(
        "symlink to /dev/zero (never read for ever)",
        "checker/zero.jpg",
        QUARANTINED,
        lambda s, o: link(s / "checker/zero.jpg", "/dev/zero"),
        "outside the source",
    ),
    Case(
        "symlink inside the source (a duplicate of its target)",
        "checker/zz-link.jpg",
        ACCEPTED,
        lambda s, o: link(s / "checker/zz-link.jpg", "checker-0000.jpg"),
    ),
    Case(
        "dangling symlink",
        "checker/dangling.jpg",
        QUARANTINED,
        lambda s, o: link(s / "checker/dangling.jpg", "no-such.jpg"),
        "dangling symbolic link",
    ),
    Case(
        "symlink loop",
        "checker/loop.jpg",
        QUARANTINED,
        lambda s, o: link(s / "checker/loop.jpg", "loop.jpg"),
        "symbolic link loop",
    ),
    Case(
        "symlink to a folder (out of the source)",
        "outside-folder",
        QUARANTINED,
        lambda s, o: link(s / "outside-folder", o),
        "outside the source",
    ),
    Case(
        "symlink to a folder (inside)",
        "checker-again",
        QUARANTINED,
        lambda s, o: link(s / "checker-again", s / "checker"),
        "symbolic link to a folder: not followed",
    ),
    Case(
        "FIFO (must not hang)",
        "checker/fifo.jpg",
        QUARANTINED,
        lambda s, o: os.mkfifo(s / "checker/fifo.jpg"),
        "not a regular file (named pipe (FIFO)): not opened",
    ),
    Case(
        "unix socket",
        "checker/sock.jpg",
        QUARANTINED,
        lambda s, o: unix_socket(s / "checker/sock.jpg"),
        "not a regular file (socket)",
    ),
    Case(
        "character device (/dev/zero's numbers)",
        "checker/dev.jpg",
        QUARANTINED,
        lambda s, o: device(s / "checker/dev.jpg"),
        "not a regular file (character device): not opened",
        needs="mknod",
    ),
    Case(
        "over-size image",
        "checker/huge.png",
        QUARANTINED,
        lambda s, o: write(s / "checker/huge.png", big_png()),
        f"too large: more than {MAX_BYTES} bytes (KIBAN_MAX_OBJECT_BYTES)",
    ),
    Case(
        "sparse 8 GiB file",
        "checker/sparse.jpg",
        QUARANTINED,
        lambda s, o: sparse(s / "checker/sparse.jpg"),
        "too large",
    ),
    Case(
        "file name that is not UTF-8",
        "checker/bad\\xff.jpg",
        QUARANTINED,
        lambda s, o: write(raw(s, b"checker/bad\xff.jpg"), jpeg(1)),
        "name is not valid UTF-8",
    ),
    Case(
        "folder name that is not UTF-8",
        "bad\\xfe/",
        QUARANTINED,
        lambda s, o: write(raw(s, b"bad\xfe/x.jpg"), jpeg(2)),
        "folder name is not valid UTF-8: not listed",
    ),
    Case(
        "newline in a name",
        "checker/new\\nline.jpg",
        QUARANTINED,
        lambda s, o: write(s / "checker/new\nline.jpg", jpeg(3)),
        "name contains control characters",
    ),
    Case(
        "terminal escape in a name",
        "checker/esc\\x1b[31m.jpg",
        QUARANTINED,
        lambda s, o: write(s / "checker/esc\x1b[31m.jpg", jpeg(4)),
        "name contains control characters",
    ),
    Case(
        "backslash in a name",
        "checker/back\\slash.jpg",
        QUARANTINED,
        lambda s, o: write(s / "checker/back\\slash.jpg", jpeg(5)),
        "name contains a backslash",
    ),
    Case(
        "Rich markup in a key",
        "checker/[bold]x[/].jpg",
        ACCEPTED,
        lambda s, o: write(s / "checker/[bold]x[/].jpg", jpeg(6)),
    ),
    Case(
        "HTML in a key",
        "checker/<script>alert(1)</script>.jpg",
        ACCEPTED,
        lambda s, o: write(s / "checker/<script>alert(1)</script>.jpg", jpeg(8)),
    ),
    Case(
        "unreadable file (chmod 000)",
        "checker/locked.jpg",
        QUARANTINED,
        lambda s, o: locked_file(s / "checker/locked.jpg"),
        "Permission denied",
        needs="unprivileged",
    ),
    Case(
        "unreadable folder (chmod 000)",
        "locked/",
        QUARANTINED,
        lambda s, o: locked_folder(s / "locked"),
        "cannot list folder: Permission denied",
        needs="unprivileged",
    ),
    Case(
        "zero-byte file",
        "checker/empty.jpg",
        QUARANTINED,
        lambda s, o: write(s / "checker/empty.jpg", b""),
        "empty file (0 bytes)",
    ),
    Case(
        "folder named like an image",
        "checker/x.jpg/inner.jpg",
        ACCEPTED,
        lambda s, o: write(s / "checker/x.jpg/inner.jpg", jpeg(9)),
    ),
    Case(
        "the folder itself is not an object",
        "checker/x.jpg",
        ABSENT,
        lambda s, o: None,
    ),
    Case(
        "hidden file",
        "checker/.hidden.jpg",
        ABSENT,
        lambda s, o: write(s / "checker/.hidden.jpg", jpeg(10)),
    ),
    Case(
        "the same image under another class",
        "stripes_fine/copy-of-checker.jpg",
        ACCEPTED,
        lambda s, o: shutil.copyfile(
            s / "checker/checker-0001.jpg", s / "stripes_fine/copy-of-checker.jpg"
        ),
    ),
]


def without_dac_override() -> list[str] | None:
    """A command prefix under which chmod 000 denies access; None when none is available."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        return None
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all"]


def can_mknod(folder: Path) -> bool:
    probe = folder / "probe-device"
    try:
        device(probe)
    except (PermissionError, OSError):
        return False
    probe.unlink()
    return True


def plant(cases: list[Case], source: Path, outside: Path) -> list[Case]:
    """Plant every case that means something here; return those planted."""
    prefix = without_dac_override()
    planted = []
    for case in cases:
        if case.needs == "unprivileged" and prefix is None:
            continue  # root without setpriv: chmod 000 would not deny anything
        if case.needs == "mknod" and not can_mknod(source):
            continue
        case.plant(source, outside)
        planted.append(case)
    return planted


def make_source(base: Path) -> tuple[Path, Path]:
    source, outside = base / "src", base / "outside"
    generate_texture_dataset(source, n_classes=3, per_class=PER_CLASS, size=64, seed=3)
    (source / "manifest.csv").unlink()  # labels from folders
    write(outside / "secret.jpg", SECRET)
    return source, outside


def kiban_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KIBAN_")}
    env.update(KIBAN_HOME=str(home), KIBAN_MAX_OBJECT_BYTES=str(MAX_BYTES), **extra)
    return env


INGEST_SCRIPT = """
import sys
from kiban.context import Context
from kiban.messages import IngestBatch
from kiban.settings import load_settings
from kiban_ingest.ingest import ingest_batch

msg = IngestBatch(batch_id=sys.argv[1], source=sys.argv[2])
print(ingest_batch(msg, Context.from_settings(load_settings())).model_dump_json())
"""


def ingest_in_subprocess(home: Path, batch_id: str, source: Path) -> BatchInfo:
    """Ingest in a child with a deadline: a hang fails the test instead of stopping it."""
    prefix = without_dac_override() or []
    try:
        done = subprocess.run(
            [*prefix, sys.executable, "-c", INGEST_SCRIPT, batch_id, source.as_uri()],
            capture_output=True,
            text=True,
            timeout=180,
            env=kiban_env(home),
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"ingest hung on the hostile source: {exc}")
    assert done.returncode == 0, done.stderr[-3000:]
    return BatchInfo.model_validate_json(done.stdout.strip().splitlines()[-1])


@dataclass
class Outcome:
    info: BatchInfo
    records: list[ImageRecord]
    quarantine: dict[str, QuarantineEntry]
    accepted: set[str]
    planted: list[Case]

    def of(self, key: str) -> str:
        if key in self.accepted:
            return ACCEPTED
        if key in self.quarantine:
            return QUARANTINED
        return ABSENT


def outcome(home: Path, batch_id: str, planted: list[Case]) -> Outcome:
    store = open_store((home / "store").as_uri())
    records = read_records(store, batch_id)
    accepted = {r.key for r in records} | {d for r in records for d in r.duplicates}
    return Outcome(
        read_batch_info(store, batch_id),
        records,
        {q.key: q for q in read_quarantine(store, batch_id)},
        accepted,
        planted,
    )


def good_keys(source_outcome: Outcome) -> set[str]:
    return {f"{c}/{c}-{i:04d}.jpg" for c in CLASSES for i in range(PER_CLASS)}


@pytest.fixture(scope="module")
def file_batch(tmp_path_factory: pytest.TempPathFactory) -> Outcome:
    base = tmp_path_factory.mktemp("hostile-file")
    source, outside = make_source(base)
    planted = plant(FILE_CASES, source, outside)
    home = base / "home"
    try:
        ingest_in_subprocess(home, "hostile", source)
    finally:  # let pytest clean up
        for path in (source / "checker" / "locked.jpg", source / "locked"):
            if path.exists():
                path.chmod(0o755)
    return outcome(home, "hostile", planted)


@pytest.mark.parametrize("case", FILE_CASES, ids=[c.name for c in FILE_CASES])
def test_file_source_case(file_batch: Outcome, case: Case) -> None:
    if case not in file_batch.planted:
        pytest.skip("needs mknod (CAP_MKNOD)" if case.needs == "mknod" else "root without setpriv")
    assert file_batch.of(case.key) == case.expect, (case.key, sorted(file_batch.quarantine))
    if case.expect == QUARANTINED:
        assert case.reason in file_batch.quarantine[case.key].reason


def test_good_images_still_ingested_and_nothing_outside_read(file_batch: Outcome) -> None:
    info = file_batch.info
    assert good_keys(file_batch) <= file_batch.accepted
    assert info.classes == CLASSES
    every_sha = {r.sha256 for r in file_batch.records} | {
        q.sha256 for q in file_batch.quarantine.values()
    }
    assert SECRET_SHA not in every_sha
    assert info.n_quarantined == len(file_batch.quarantine)
    expected_q = {c.key for c in file_batch.planted if c.expect == QUARANTINED}
    assert set(file_batch.quarantine) == expected_q
    for key in file_batch.quarantine:
        key.encode("utf-8")  # every key is text, whatever the name was on disk
        assert "\n" not in key and "\x1b" not in key


def test_conflicting_duplicate_labels_are_in_the_batch_summary(file_batch: Outcome) -> None:
    conflicts = {c.kept.key: c for c in file_batch.info.label_conflicts}
    assert file_batch.info.n_label_conflicts == len(conflicts) == 1
    conflict = conflicts["checker/checker-0001.jpg"]  # first key in code-point order wins
    assert conflict.kept.label == "checker"
    assert [(d.key, d.label) for d in conflict.dropped] == [
        ("stripes_fine/copy-of-checker.jpg", "stripes_fine")
    ]
    # the link inside the source is a duplicate with the same label: no conflict
    by_key = {r.key: r for r in file_batch.records}
    assert "checker/zz-link.jpg" in by_key["checker/checker-0000.jpg"].duplicates


# --- manifests: bounded, never quoted, rows outside the source set aside -------------


def ctx_for(home: Path, **overrides: object) -> Context:
    settings = Settings(home=home, max_object_bytes=MAX_BYTES, **overrides)  # type: ignore[arg-type]
    use_settings(settings)
    return Context.from_settings(settings)


@dataclass(frozen=True)
class ManifestCase:
    name: str
    write: Callable[[Path, Path], str]  # (source, outside) -> the manifest URI or key
    error: str  # a substring of the ManifestError


def _manifest_file(folder: Path, name: str, data: bytes) -> str:
    write(folder / name, data)
    return (folder / name).as_uri()


def _outside_link(source: Path, outside: Path) -> str:
    write(outside / "labels.csv", b"key,label\nchecker/checker-0000.jpg,x\n")
    link(source / "labels-link.csv", outside / "labels.csv")
    return "labels-link.csv"


def _fifo_manifest(source: Path, outside: Path) -> str:
    os.mkfifo(source / "labels-fifo.csv")
    return "labels-fifo.csv"


PASSWD_LIKE = b"root:x:0:0:root:/root:/bin/bash\nsecret-line-9f3:x:1:1::/:/bin/sh\n"
MANIFEST_CASES = [
    ManifestCase(
        "binary file (an image)",
        lambda s, o: _manifest_file(o, "labels.csv", SECRET),
        "not UTF-8 text",
    ),
    ManifestCase(
        "a password-file-like text",
        lambda s, o: _manifest_file(o, "labels.csv", PASSWD_LIKE),
        "line 1: expected a header row naming the columns key,label",
    ),
    ManifestCase(
        "the same, as JSONL",
        lambda s, o: _manifest_file(o, "labels.jsonl", PASSWD_LIKE),
        "line 1: invalid JSON",
    ),
    ManifestCase(
        "a key in the source that is an image",
        lambda s, o: "checker/checker-0000.jpg",
        "checker-0000.jpg: not UTF-8 text",
    ),
    ManifestCase("symlink out of the source", _outside_link, "outside the source"),
    ManifestCase("FIFO (must not hang)", _fifo_manifest, "named pipe (FIFO)"),
    ManifestCase(
        "larger than the limit",
        lambda s, o: _manifest_file(
            o, "labels.csv", b"key,label\n" + b"checker/x.jpg,checker\n" * 5000
        ),
        f"larger than {MAX_BYTES} bytes (KIBAN_MAX_OBJECT_BYTES)",
    ),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", MANIFEST_CASES, ids=[c.name for c in MANIFEST_CASES])
def test_manifest_that_is_not_one_is_refused_unquoted(case: ManifestCase, tmp_path: Path) -> None:
    source, outside = make_source(tmp_path)
    manifest = case.write(source, outside)
    ctx = ctx_for(tmp_path / "home")
    with pytest.raises(ManifestError) as info:
        ingest_batch(IngestBatch(batch_id="m", source=source.as_uri(), manifest=manifest), ctx)
    message = str(info.value)
    assert case.error in message, message
    for secret in ("root:x", "secret-line-9f3", "/bin/bash", "JFIF", "checker/x.jpg,"):
        assert secret not in message, message
    assert not ctx.store.exists("batches/m/batch.json")


def test_manifest_rows_outside_the_source_are_quarantined(tmp_path: Path) -> None:
    source, outside = make_source(tmp_path)
    rows = [
        "key,label",
        "checker/checker-0000.jpg,checker",
        "../../etc/passwd,evil",
        "/etc/passwd,evil",
        "../outside/secret.jpg,evil",
        "checker/../../outside/secret.jpg,evil",
        "stripes_fine/stripes_fine-0000.jpg,stripes_fine",
    ]
    manifest = _manifest_file(outside, "labels.csv", ("\n".join(rows) + "\n").encode())
    ctx = ctx_for(tmp_path / "home")
    info = ingest_batch(
        IngestBatch(batch_id="rows", source=source.as_uri(), manifest=manifest), ctx
    )
    quarantine = {q.key: q.reason for q in read_quarantine(ctx.store, "rows")}
    assert quarantine == {
        "../../etc/passwd": "manifest line 3: key escapes the source ('..' or '.' segment)",
        "/etc/passwd": "manifest line 4: key escapes the source (absolute path; keys are "
        "relative to the source)",
        "../outside/secret.jpg": "manifest line 5: key escapes the source ('..' or '.' segment)",
        "checker/../../outside/secret.jpg": "manifest line 6: key escapes the source "
        "('..' or '.' segment)",
    }
    records = read_records(ctx.store, "rows")
    assert SECRET_SHA not in {r.sha256 for r in records}
    assert info.classes == ["checker", "stripes_fine"]  # the good rows apply
    assert info.n_accepted == len(CLASSES) * PER_CLASS


# --- the real embedded pipeline over a hostile source ----------------------------------


@pytest.mark.timeout(900)
def test_embedded_pipeline_scores_the_good_images(tmp_path: Path, publish_models) -> None:  # type: ignore[no-untyped-def]
    """FIFO, links out, /dev/zero, over-size and undecodable names next to good images: the
    run ends, and every good image is encoded and scored."""
    from kiban.pipeline import run_batch

    source, outside = make_source(tmp_path)
    chosen = {
        "symlink out of the source",
        "symlink to /dev/zero (never read for ever)",
        "FIFO (must not hang)",
        "over-size image",
        "sparse 8 GiB file",
        "file name that is not UTF-8",
        "Rich markup in a key",
        "the same image under another class",
    }
    planted = plant([c for c in FILE_CASES if c.name in chosen], source, outside)
    settings = Settings(home=tmp_path / "home", max_object_bytes=MAX_BYTES, chunk_size=8)
    store = open_store(settings.resolved_store_uri, create=True)
    models = publish_models(store)[:1]
    report = run_batch(settings, source.as_uri(), models, batch_id="hostile-run")

    batch = report["batch"]
    n_good = len(CLASSES) * PER_CLASS + 1  # + the markup-named image
    assert batch["n_accepted"] == n_good
    assert batch["n_quarantined"] == sum(c.expect == QUARANTINED for c in planted)
    assert batch["n_label_conflicts"] == 1
    assert batch["label_conflicts"][0]["kept"] == {
        "key": "checker/checker-0001.jpg",
        "label": "checker",
    }
    assert batch["label_conflicts"][0]["dropped"] == [
        {"key": "stripes_fine/copy-of-checker.jpg", "label": "stripes_fine"}
    ]
    reasons = {q["key"]: q["reason"] for q in batch["quarantine"]}
    assert "named pipe (FIFO)" in reasons["checker/fifo.jpg"]
    assert "too large" in reasons["checker/huge.png"]
    (model,) = report["models"]
    assert model["name"] == models[0]
    assert report["protocol"]["n_images"] == n_good
    keys = {r.key for r in read_records(store, "hostile-run")}
    assert "checker/[bold]x[/].jpg" in keys


# --- distributed mode: messages stay under the allowed roots and buckets -------------


def distributed(home: Path, roots: list[Path], **extra: object) -> Settings:
    return Settings(
        home=home,
        mode="distributed",
        allowed_roots=[str(r) for r in roots],
        max_object_bytes=MAX_BYTES,
        **extra,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    "where",
    [
        "file:///etc/",
        "{base}/../",
        "{base}/allowed/../outside/",
        "{base}/allowed2/",
        "{base}/allowed/escape/",
    ],
)
def test_distributed_source_outside_roots_is_refused(tmp_path: Path, where: str) -> None:
    allowed = tmp_path / "allowed"
    write(allowed / "checker" / "a.jpg", jpeg(11))
    write(tmp_path / "allowed2" / "checker" / "b.jpg", jpeg(12))
    write(tmp_path / "outside" / "secret.jpg", SECRET)
    link(allowed / "escape", tmp_path / "outside")
    uri = where.format(base=tmp_path.as_uri())
    settings = distributed(tmp_path / "home", [allowed])
    ctx = Context.from_settings(settings)
    with pytest.raises(ForbiddenLocationError, match="KIBAN_ALLOWED_ROOTS"):
        ingest_batch(IngestBatch(batch_id="x", source=uri), ctx)
    manifest = (tmp_path / "outside" / "labels.csv").as_uri()
    write(tmp_path / "outside" / "labels.csv", b"key,label\n")
    with pytest.raises(ForbiddenLocationError, match="^manifest"):
        ingest_batch(IngestBatch(batch_id="y", source=allowed.as_uri(), manifest=manifest), ctx)
    info = ingest_batch(IngestBatch(batch_id="ok", source=allowed.as_uri()), ctx)
    assert info.n_accepted == 1


def test_distributed_task_dead_letters_a_forbidden_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the task and its failure path: dead-lettered at once with the reason."""
    import kiban.tasks
    from kiban_ingest.tasks import ingest_batch_task

    queued: list[dict[str, object]] = []
    monkeypatch.setattr(  # no broker here: keep what would go to the deadletter queue
        kiban.tasks.app, "send_task", lambda name, kwargs, queue: queued.append(kwargs)
    )
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    use_settings(distributed(tmp_path / "home", [allowed]))
    result = ingest_batch_task.apply(
        kwargs={"message": {"batch_id": "evil", "source": "file:///etc/"}}
    )
    assert result.failed() and isinstance(result.result, ForbiddenLocationError)
    store = open_store((tmp_path / "home" / "store").as_uri())
    letters = [json.loads(store.get(o.key)) for o in store.list("deadletter")]
    assert len(letters) == 1 and len(queued) == 1
    assert letters[0]["reason"].startswith("ForbiddenLocationError: source file:///etc/: ")
    assert "outside KIBAN_ALLOWED_ROOTS" in letters[0]["reason"]
    assert letters[0]["payload"] == {"batch_id": "evil", "source": "file:///etc/"}
    assert not store.exists("batches/evil/batch.json")


def test_export_destination_outside_roots_and_unwritable(tmp_path: Path) -> None:
    from kiban_reporter.export import export_report

    allowed = tmp_path / "allowed"
    allowed.mkdir()
    ctx = Context.from_settings(distributed(tmp_path / "home", [allowed]))
    for where in ["file:///etc/kiban/", (tmp_path / "elsewhere").as_uri()]:
        with pytest.raises(ForbiddenLocationError, match="^export destination"):
            export_report(ExportReport(batch_id="b", destination=where), ctx)
    assert not (tmp_path / "elsewhere").exists()
    # embedded: anywhere asked, but an unwritable place is one clear StoreError
    from kiban.errors import StoreError

    embedded = Context.from_settings(Settings(home=tmp_path / "home2"))
    embedded.store.put("reports/b/0001/report.json", b"{}")
    embedded.store.put("reports/b/0001/report.md", b"#")
    write(tmp_path / "a-file", b"x")
    with pytest.raises(StoreError, match="cannot create the directory"):
        export_report(
            ExportReport(batch_id="b", destination=(tmp_path / "a-file" / "sub").as_uri()),
            embedded,
        )
    written = export_report(
        ExportReport(batch_id="b", destination=(tmp_path / "team").as_uri()), embedded
    )
    assert sorted(
        p.relative_to(tmp_path / "team").as_posix()
        for p in (tmp_path / "team").rglob("*")
        if p.is_file()
    ) == [
        "b/0001/report.json",
        "b/0001/report.md",
    ]
    assert len(written) == 2


# --- S3 (SeaweedFS) ----------------------------------------------------------------------

S3_CASES = [  # (key under the source prefix, body, outcome, reason)
    ("checker/space name.jpg", jpeg(21), ACCEPTED, ""),
    ("checker/ünïcødé.jpg", jpeg(22), ACCEPTED, ""),
    ("checker/[bold]x[/].jpg", jpeg(23), ACCEPTED, ""),
    ("checker/<script>alert(1)</script>.jpg", jpeg(24), ACCEPTED, ""),
    ("checker/a+b&c=d?e#f%20.jpg", jpeg(25), ACCEPTED, ""),
    ("checker/new\nline.jpg", jpeg(26), QUARANTINED, "name contains control characters"),
    ("checker/esc\x1b[31m.jpg", jpeg(27), QUARANTINED, "name contains control characters"),
    ("checker/huge.png", big_png(), QUARANTINED, f"too large: more than {MAX_BYTES} bytes"),
    ("checker/empty.jpg", b"", QUARANTINED, "empty file (0 bytes)"),
    ("checker/x.jpg/", b"", ABSENT, ""),  # a folder marker is not an object
    ("checker/.hidden.jpg", jpeg(28), ABSENT, ""),
]


@pytest.fixture
def s3_source(s3_server, s3_bucket: str, tmp_path: Path) -> str:  # type: ignore[no-untyped-def]
    folder = tmp_path / "images"
    generate_texture_dataset(folder, n_classes=3, per_class=PER_CLASS, size=64, seed=3)
    (folder / "manifest.csv").unlink()
    s3_server.upload_folder(folder, s3_bucket, "night")
    client = s3_server.client()
    for key, body, _, _ in S3_CASES:
        client.put_object(Bucket=s3_bucket, Key=f"night/{key}", Body=body)
    client.put_object(Bucket=s3_bucket, Key="outside/secret.jpg", Body=SECRET)
    return f"s3://{s3_bucket}/night"


def s3_ctx(s3_server, home: Path, **extra: object) -> Context:  # type: ignore[no-untyped-def]
    settings = Settings(
        home=home,
        s3_endpoint_url=s3_server.endpoint_url,
        max_object_bytes=MAX_BYTES,
        **extra,  # type: ignore[arg-type]
    )
    use_settings(settings)
    return Context.from_settings(settings)


@pytest.mark.timeout(300)
def test_s3_source_corpus(s3_server, s3_source: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ctx = s3_ctx(s3_server, tmp_path / "home")
    info = ingest_batch(IngestBatch(batch_id="s3", source=s3_source), ctx)
    records = read_records(ctx.store, "s3")
    accepted = {r.key for r in records} | {d for r in records for d in r.duplicates}
    quarantine = {q.key: q.reason for q in read_quarantine(ctx.store, "s3")}
    from kiban.store import printable_key

    for key, _, expect, reason in S3_CASES:
        shown = printable_key(key)
        got = ACCEPTED if shown in accepted else QUARANTINED if shown in quarantine else ABSENT
        assert got == expect, (key, got)
        if expect == QUARANTINED:
            assert reason in quarantine[shown], (key, quarantine[shown])
    good = {f"{c}/{c}-{i:04d}.jpg" for c in CLASSES for i in range(PER_CLASS)}
    assert good <= accepted
    assert SECRET_SHA not in {r.sha256 for r in records}
    assert info.n_quarantined == sum(e == QUARANTINED for _, _, e, _ in S3_CASES)


def test_s3_get_is_bounded_while_streaming(s3_server, s3_bucket: str) -> None:  # type: ignore[no-untyped-def]
    """Even when the server's Content-Length is not trusted, at most limit + 1 bytes are
    read from the body (a wrapper counts what the stream handed out)."""
    from kiban.errors import ObjectTooLargeError

    store = open_store(
        f"s3://{s3_bucket}/p",
        endpoint_url=s3_server.endpoint_url,
        create=True,
        max_object_bytes=MAX_BYTES,
    )
    store.put("big.bin", b"x" * (4 * 1024 * 1024))
    with pytest.raises(ObjectTooLargeError, match="KIBAN_MAX_OBJECT_BYTES"):
        store.get("big.bin")  # refused on the announced length
    counted: list[int] = []
    real_get = store._s3.get_object  # type: ignore[attr-defined]

    def lying_get(**kwargs: object) -> dict[str, object]:
        response = real_get(**kwargs)
        body = response["Body"]
        real_read = body.read

        def read(amt: int | None = None) -> bytes:
            data = real_read(amt)
            counted.append(len(data))
            return data

        body.read = read
        return {**response, "ContentLength": 0}

    store._s3.get_object = lying_get  # type: ignore[attr-defined]
    with pytest.raises(ObjectTooLargeError):
        store.get("big.bin")
    assert sum(counted) == MAX_BYTES + 1
    assert store.get("big.bin", max_bytes=8 * 1024 * 1024) == b"x" * (4 * 1024 * 1024)


def test_s3_manifest_that_is_not_one(s3_server, s3_source: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ctx = s3_ctx(s3_server, tmp_path / "home")
    bucket = s3_source.split("/")[2]
    for manifest in [f"{s3_source}/checker/checker-0000.jpg", f"s3://{bucket}/outside/secret.jpg"]:
        with pytest.raises(ManifestError) as info:
            ingest_batch(IngestBatch(batch_id="m", source=s3_source, manifest=manifest), ctx)
        assert "not UTF-8 text" in str(info.value) or "line 1" in str(info.value)
        assert "JFIF" not in str(info.value)
    with pytest.raises(ManifestError, match="larger than"):
        ingest_batch(IngestBatch(batch_id="m", source=s3_source, manifest="checker/huge.png"), ctx)


def test_s3_allowed_buckets(s3_server, s3_source: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bucket = s3_source.split("/")[2]
    refused = s3_ctx(
        s3_server, tmp_path / "h1", mode="distributed", allowed_buckets=["images-only"]
    )
    with pytest.raises(ForbiddenLocationError, match=f"bucket '{bucket}' is not in"):
        ingest_batch(IngestBatch(batch_id="b", source=s3_source), refused)
    allowed = s3_ctx(s3_server, tmp_path / "h2", mode="distributed", allowed_buckets=[bucket])
    info = ingest_batch(IngestBatch(batch_id="b", source=s3_source), allowed)
    assert info.n_accepted >= len(CLASSES) * PER_CLASS


def test_embeddings_export_writes_only_where_asked(tmp_path: Path) -> None:
    """`kiban embeddings export --out`: exactly that path (no '.npz' added), and one clear
    line with exit status 2 for a place that cannot be written."""
    from typer.testing import CliRunner

    from kiban_cli.main import app

    (tmp_path / "empty").mkdir()
    ctx = Context.from_settings(Settings(home=tmp_path / "kiban-home"))  # the CLI's home here
    ingest_batch(IngestBatch(batch_id="e", source=(tmp_path / "empty").as_uri()), ctx)
    runner = CliRunner()
    args = ["embeddings", "export", "--batch", "e", "--model", "m", "--out"]
    result = runner.invoke(app, [*args, str(tmp_path / "vectors")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "vectors").is_file() and not (tmp_path / "vectors.npz").exists()
    write(tmp_path / "a-file", b"x")
    result = runner.invoke(app, [*args, str(tmp_path / "a-file" / "x.npz")])
    assert result.exit_code == 2
    assert "cannot write" in result.output and "Traceback" not in result.output
    assert (tmp_path / "a-file").read_bytes() == b"x"
