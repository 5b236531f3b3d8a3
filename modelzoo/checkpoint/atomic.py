"""What modelzoo may delete, and how every writer makes its output appear all at once.

Two proofs decide what may be deleted; nothing else ever is:

* **A finished output of ours** carries ``.modelzoo-output.json`` (``{"writer": "modelzoo",
  "kind": ..., "files": [relative paths]}``), written last, just before the rename. A directory
  may be replaced (``--overwrite``) only when that marker lists *exactly* the files present: no
  file more, none missing, no directory that holds no listed file. A caller may give another
  proof of the same strength (a dataset's sha256 manifest that lists exactly the files present).
* **Scratch of ours** (temp dirs that become the output, work dirs, an old output moved aside) is
  a hidden sibling ``.{name}.{tag}-{pid}-{random}`` holding ``.modelzoo-scratch.json`` (``{"pid",
  "create_time", "host"}``). It is debris once that process is gone (dead pid, or a pid reused by a
  process started later), on this host. (The owner file is left out of every listing, and removed
  once the scratch has become the output.) The next run removes such debris before it starts and says
  so; a live run's scratch and anything without the owner file are left alone.

:func:`atomic_dir` puts both together: refuse an output that overlaps an input or that is not
replaceable, clean the target's debris, build in scratch, write the marker, fsync, rename.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

OUTPUT_MARKER = ".modelzoo-output.json"
SCRATCH_OWNER = ".modelzoo-scratch.json"
WRITER = "modelzoo"

Proof = Callable[[Path], "str | None"]


class OutputError(RuntimeError):
    """An output path that cannot be written or replaced; the message names it and the fix."""


# ---------------------------------------------------------------------------- what a dir holds


def tree(root: Path) -> tuple[set[str], set[str]]:
    """``(files, dirs)`` under ``root`` as relative posix paths (symlinks count as files)."""
    files, dirs = set(), set()
    for folder, dirnames, filenames in os.walk(root):
        rel = Path(folder).relative_to(root)
        for name in dirnames:
            path = Path(folder) / name
            (files if path.is_symlink() else dirs).add((rel / name).as_posix())
        files.update((rel / name).as_posix() for name in filenames)
    return files, dirs


def exactly_listed(root: Path, listed: set[str], *, ignore: set[str] = frozenset()) -> str | None:
    """None when the files under ``root`` (less ``ignore``) are exactly ``listed`` and every directory
    holds a listed file; otherwise what differs, in words."""
    files, dirs = tree(root)
    files -= set(ignore)
    extra, missing = sorted(files - listed), sorted(listed - files)
    used = {parent.as_posix() for name in listed for parent in Path(name).parents if parent != Path(".")}
    empty = sorted(d for d in dirs - used if not any(i == d or i.startswith(d + "/") for i in ignore))
    if extra:
        return f"it holds {len(extra)} file(s) not written by modelzoo (e.g. {extra[0]})"
    if missing:
        return f"files listed as written by modelzoo are missing (e.g. {missing[0]})"
    if empty:
        return f"it holds a directory not written by modelzoo ({empty[0]})"
    return None


def write_output_marker(directory: Path, kind: str) -> Path:
    """List every file now in ``directory`` in its marker (call when the output is complete)."""
    directory = Path(directory)
    files, _ = tree(directory)
    files -= {OUTPUT_MARKER, SCRATCH_OWNER}
    marker = directory / OUTPUT_MARKER
    marker.write_text(json.dumps({"writer": WRITER, "kind": kind, "files": sorted(files)}, indent=1) + "\n")
    return marker


def marker_proof(*kinds: str) -> Proof:
    """A proof that a dir is an output of one of ``kinds`` written by modelzoo (see module doc)."""

    def proof(directory: Path) -> str | None:
        marker = directory / OUTPUT_MARKER
        try:
            data = json.loads(marker.read_text())
            listed, writer, kind = set(data["files"]), data["writer"], data["kind"]
        except FileNotFoundError:
            return f"it has no {OUTPUT_MARKER} (not an output modelzoo wrote)"
        except (OSError, ValueError, KeyError, TypeError) as err:
            return f"its {OUTPUT_MARKER} is unreadable ({err})"
        if writer != WRITER or kind not in kinds:
            return f"its {OUTPUT_MARKER} names a {kind!r} output, not {' or '.join(map(repr, kinds))}"
        return exactly_listed(directory, listed, ignore={OUTPUT_MARKER, SCRATCH_OWNER})

    return proof


def check_replaceable(target: Path, proof: Proof, *, what: str, error: type[Exception] = OutputError) -> None:
    """Raise ``error`` unless ``target`` is absent, an empty dir, or a dir ``proof`` accepts."""
    target = Path(target)
    if not target.exists() and not target.is_symlink():
        return
    if target.is_symlink() or not target.is_dir():
        raise error(f"{what} {target} exists and is not a directory; refusing to replace it -- choose another path")
    resolved, cwd = target.resolve(), Path.cwd().resolve()
    if resolved == Path(resolved.anchor) or resolved == Path.home().resolve() or resolved in (cwd, *cwd.parents):
        raise error(f"{what} {target}: refusing to replace a root, home or working directory")
    if not any(target.iterdir()):
        return
    reason = proof(target)
    if reason is not None:
        raise error(f"{what} {target} exists and {reason}; refusing to delete it -- remove it yourself "
                    "or choose another path")


def check_no_overlap(output: Path, inputs: list[str | Path], *, what: str,
                     error: type[Exception] = OutputError) -> None:
    """Raise unless ``output`` is separate from every input (not equal, inside or around it)."""
    out = Path(output).resolve()
    for item in inputs:
        src = Path(item).resolve()
        if out == src or src in out.parents or out in src.parents:
            raise error(f"{what} {output} overlaps the input {item}; write to a separate directory")


# ---------------------------------------------------------------------------- scratch and debris


def _process_started(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, ValueError):
        return None


def make_scratch(target: Path, tag: str) -> Path:
    """Create the scratch dir ``.{target.name}.{tag}-{pid}-{random}`` beside ``target``, owned by us."""
    target = Path(target)
    target.absolute().parent.mkdir(parents=True, exist_ok=True)
    path = target.absolute().parent / f".{target.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    claim_scratch(path)
    return path


def claim_scratch(path: Path) -> None:
    """Write the owner file into the scratch dir ``path`` (this process, this host)."""
    owner = {"pid": os.getpid(), "create_time": _process_started(os.getpid()), "host": socket.gethostname()}
    (Path(path) / SCRATCH_OWNER).write_text(json.dumps(owner) + "\n")


def is_abandoned(path: Path) -> bool:
    """True when ``path`` is scratch of ours whose owner process is gone (see module doc)."""
    try:
        owner = json.loads((Path(path) / SCRATCH_OWNER).read_text())
        pid, started, host = int(owner["pid"]), owner["create_time"], owner["host"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if host != socket.gethostname():
        return False
    now = _process_started(pid)
    return now is None or (started is not None and abs(now - started) > 1.0)


def scratch_re(name_pattern: str) -> re.Pattern:
    """The names :func:`make_scratch` gives scratch of targets whose name matches ``name_pattern``."""
    return re.compile(rf"^\.(?:{name_pattern})\.[a-z]+-\d+-[0-9a-f]{{8}}$")


def scratch_of(target: Path) -> list[Path]:
    """The scratch-named siblings of ``target`` (``.{name}.{tag}-{pid}-{hex}``), ours or not."""
    target = Path(target).absolute()
    pattern = scratch_re(re.escape(target.name))
    return [p for p in target.parent.iterdir() if pattern.match(p.name)] if target.parent.is_dir() else []


def debris_note(removed: list[Path]) -> str:
    return f"removed {len(removed)} scratch dir(s) left by an interrupted run: {', '.join(p.name for p in removed)}"


def clean_debris(candidates: Iterable[Path]) -> list[Path]:
    """Remove those of ``candidates`` that are abandoned scratch of ours; returns what was removed."""
    removed = []
    for path in candidates:
        if path.is_dir() and not path.is_symlink() and is_abandoned(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def remove_tree(path: Path) -> None:
    """Delete a dir of ours so that a kill midway never leaves it half-deleted under its name:
    rename it to owned scratch first, then remove that."""
    path = Path(path)
    shutil.rmtree(_move_aside(path), ignore_errors=True)


def _move_aside(path: Path) -> Path:
    """Rename ``path`` to owned scratch ``.{name}.old-{pid}-{hex}``. The owner file is written first:
    a kill in between leaves ``path`` whole (listings ignore the owner file), never unowned debris."""
    claim_scratch(path)
    aside = path.parent / f".{path.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.rename(path, aside)
    return aside


def fsync_path(path: Path) -> None:
    """fsync a file or directory by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (so a rename publishes durable data)."""
    for folder, _, filenames in os.walk(root):
        for name in filenames:
            if not (Path(folder) / name).is_symlink():
                fsync_path(Path(folder) / name)
        fsync_path(Path(folder))


def replace_file(tmp: Path, target: Path) -> None:
    """Publish the complete file ``tmp`` as ``target`` durably: fsync, ``os.replace``, fsync the dir."""
    fsync_path(tmp)
    os.replace(tmp, target)
    fsync_path(Path(target).absolute().parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False when unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "renameat2"):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def finish(scratch: Path, target: Path, kind: str | None) -> None:
    """Make the complete ``scratch`` the output ``target``: its marker (with ``kind``), fsync, publish."""
    if kind is not None:
        write_output_marker(scratch, kind)
    fsync_tree(scratch)
    publish(scratch, target)


def publish(scratch: Path, target: Path) -> None:
    """Rename the finished ``scratch`` to ``target``; an existing ``target`` (already proven
    replaceable) is moved aside first and removed after, so ``target`` is always whole."""
    target = Path(target)
    if target.exists():
        claim_scratch(target)  # the old output becomes scratch of ours once it has been swapped out
        if _exchange(scratch, target):  # atomic: ``target`` is old or new at every instant
            shutil.rmtree(scratch, ignore_errors=True)
        else:  # no renameat2 here: a kill between the two renames leaves ``target`` missing
            old = _move_aside(target)
            os.rename(scratch, target)
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(scratch, target)
    fsync_path(target.absolute().parent)
    (target / SCRATCH_OWNER).unlink(missing_ok=True)


@contextmanager
def atomic_dir(target: str | Path, *, kind: str | None, overwrite: bool, inputs: list[str | Path] = (),
               proof: Proof | None = None, what: str = "--output", overwrite_flag: str = "--overwrite",
               error: type[Exception] = OutputError,
               say: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Yield a scratch dir that becomes ``target`` when the block succeeds.

    Refuses (``error``) an output that overlaps ``inputs``, exists without ``overwrite``, or exists
    and is not proven ours (``proof``, default: a ``kind`` marker). Abandoned scratch of ``target``
    is removed first (``say`` gets the :func:`debris_note`). With ``kind`` the marker is written last. On any
    exception, or a kill, ``target`` is as it was.
    """
    target = Path(target)
    proof = proof or marker_proof(kind or "")
    check_no_overlap(target, list(inputs), what=what, error=error)
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise error(f"{what} {target} already exists; pass {overwrite_flag} to replace it, or choose another path")
        check_replaceable(target, proof, what=what, error=error)
    try:
        removed = clean_debris(scratch_of(target))
        scratch = make_scratch(target, "tmp")
    except OSError as err:
        raise error(f"{what} {target}: cannot write beside it ({err})") from err
    if removed and say is not None:
        say(debris_note(removed))
    try:
        yield scratch
        finish(scratch, target, kind)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
