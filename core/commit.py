"""How a pipeline replaces the files of its output folder without ever leaving it half old, half new.

A build writes its whole new output into `OUT/.tmp-<id>/`. The commit then
1. writes a journal, `OUT/_commit.json` (written beside and renamed into place: it exists whole or not at all),
   naming the new files and the old ones to remove;
2. moves each new file over its target and removes the old ones;
3. deletes the journal and the temporary folder.
A crash before (1) leaves the output untouched (the next build removes the stale temporary folder); a crash after
(1) leaves a journal that the next build, or `recover`, rolls forward: every move it names is repeated if its
source still exists, so the output ends exactly as the interrupted build meant it. Readers refuse a folder with a
journal (`check_readable`) rather than read a mix.

One build at a time per output: `output_lock` holds a lock file in the folder (filelock); a second build waits up
to its timeout and then stops with one line. Remote (fsspec) outputs are not locked: object stores have no
renames to interleave, and their users schedule builds.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import uuid

import fsspec

from core.errors import UserError

log = logging.getLogger(__name__)

JOURNAL = "_commit.json"
LOCK = ".smitin-build.lock"
TMP_PREFIX = ".tmp-"


class OutputBusy(UserError):
    """Another build holds the output's lock."""


def _local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


@contextlib.contextmanager
def output_lock(out: str, timeout_s: float = 0.0):
    """Hold OUT's build lock for the block; another holder makes this wait `timeout_s`, then raise `OutputBusy`."""
    fs, root = fsspec.core.url_to_fs(out)
    if not _local(fs):
        yield
        return
    from filelock import FileLock, Timeout

    try:
        fs.makedirs(root, exist_ok=True)
    except (PermissionError, FileExistsError, NotADirectoryError, OSError) as e:
        raise UserError(f"cannot use {out} as an output folder: {getattr(e, 'strerror', None) or e}") from None
    lock = FileLock(os.path.join(root, LOCK))
    try:
        lock.acquire(timeout=timeout_s)
    except Timeout:
        raise OutputBusy(
            f"another build is writing {out} (lock {os.path.join(root, LOCK)}); wait for it to finish "
            f"or give it --wait-seconds"
        ) from None
    except OSError as e:
        raise UserError(f"cannot lock {out}: {e.strerror or e}") from None
    try:
        yield
    finally:
        lock.release()


def new_tmp_dir(fs, root: str) -> str:
    tmp = f"{root.rstrip('/')}/{TMP_PREFIX}{uuid.uuid4().hex[:8]}"
    fs.makedirs(tmp, exist_ok=True)
    return tmp


def _apply(fs, root: str, plan: dict) -> None:
    tmp = plan["tmp"]
    for name in plan["remove"]:
        path = f"{root}/{name}"
        if fs.exists(path):
            fs.rm(path)
    for name in plan["put"]:
        src, dst = f"{tmp}/{name}", f"{root}/{name}"
        if fs.exists(src):
            if _local(fs):
                os.replace(src, dst)  # one atomic rename, even over an existing file
            else:
                if fs.exists(dst):
                    fs.rm(dst)
                fs.mv(src, dst)


def commit(fs, tmp_root: str, out_root: str, managed_globs: tuple[str, ...], fail_after: int | None = None) -> None:
    """Make the files of `tmp_root` the output: journal, moves, removal of managed files the new build does not
    have (e.g. shards of another shard count). `fail_after` is a test hook: stop (as a crash would) after that
    many file operations of step 2."""
    root = out_root.rstrip("/")
    new = sorted(p.rsplit("/", 1)[1] for p in fs.ls(tmp_root, detail=False))
    old = {p.rsplit("/", 1)[1] for g in managed_globs for p in fs.glob(f"{root}/{g}")}
    plan = {"tmp": tmp_root, "put": new, "remove": sorted(old - set(new))}
    staged = f"{root}/.{JOURNAL}.{uuid.uuid4().hex[:8]}"
    with fs.open(staged, "w") as f:
        json.dump(plan, f)
        _sync(f)  # on disk before it is named: a power cut must not leave an empty journal
    fs.mv(staged, f"{root}/{JOURNAL}")
    if fail_after is not None:
        # crash simulation: do only the first `fail_after` operations
        ops = [("rm", n) for n in plan["remove"]] + [("mv", n) for n in plan["put"]]
        for kind, name in ops[:fail_after]:
            _apply(
                fs,
                root,
                {"tmp": tmp_root, "remove": [name] if kind == "rm" else [], "put": [name] if kind == "mv" else []},
            )
        raise RuntimeError(f"injected crash after {fail_after} commit operations")
    _apply(fs, root, plan)
    fs.rm(f"{root}/{JOURNAL}")
    fs.rm(tmp_root, recursive=True)


def _sync(f) -> None:
    """Flush a file written through fsspec to the disk, where the file system has one."""
    try:
        f.flush()
        os.fsync(f.fileno())
    except (AttributeError, OSError, io.UnsupportedOperation):
        pass  # object stores and memory file systems: nothing to sync


def recover(out: str) -> bool:
    """Finish an interrupted commit (roll its journal forward) and remove temporary folders of killed builds.
    Call with the output's lock held. True when a journal was completed."""
    fs, root = fsspec.core.url_to_fs(out)
    root = root.rstrip("/")
    if not fs.exists(root):
        return False
    done = False
    journal = f"{root}/{JOURNAL}"
    if fs.exists(journal):
        with fs.open(journal, "r") as f:
            try:
                plan = json.load(f)
            except ValueError:
                raise UserError(
                    f"{out}: the commit journal {JOURNAL} is damaged; the output may mix two builds: rebuild it into "
                    "an empty folder"
                ) from None
        log.warning("%s: completing a build that was interrupted while committing", out)
        _apply(fs, root, plan)
        fs.rm(journal)
        done = True
    for p in fs.ls(root, detail=False):
        name = p.rsplit("/", 1)[1]
        if name.startswith(TMP_PREFIX) or (name.startswith(f".{JOURNAL}.")):
            fs.rm(p, recursive=True)
    return done


def check_readable(out: str) -> None:
    """Refuse to read an output whose last commit was interrupted (a reader would see a mix of two builds)."""
    fs, root = fsspec.core.url_to_fs(out)
    if fs.exists(f"{root.rstrip('/')}/{JOURNAL}"):
        raise UserError(
            f"{out} was being rewritten when its build stopped; run the build again (it completes the "
            f"interrupted one) before reading it"
        )
