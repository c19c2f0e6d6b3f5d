"""The command-line tool: ``python -m pytest_sandbox`` / ``pytest-sandbox``, to prepare images.

    pytest-sandbox images                 list stored images
    pytest-sandbox pull REF               from a registry (REF: [host[:port]/]name[:tag][@digest])
    pytest-sandbox push REF               to the registry REF names
    pytest-sandbox import SRC REF         SRC: oci:DIR[:TAG] or docker-archive:FILE (skopeo's names)
    pytest-sandbox export REF DST         DST: oci:DIR[:TAG] or docker-archive:FILE
    pytest-sandbox tag REF NEWREF         another name for an image
    pytest-sandbox rmi REF...             remove tags (an image goes with its last tag)
    pytest-sandbox prune                  remove untagged images and unreferenced layers
    pytest-sandbox inspect REF...         an image's record as JSON

The store is ``<data root>/store``: ``--data-root``, else ``$PYTEST_SANDBOX_DATA_ROOT``, else
``~/.cache/pytest-sandbox`` -- the same one the pytest plugin uses.  Registries reached over plain
http and mirrors come from ``--insecure-registry``/``--registry-mirror``, else
``$PYTEST_SANDBOX_INSECURE_REGISTRIES``/``$PYTEST_SANDBOX_REGISTRY_MIRRORS``.  ``pull``, ``push``
and ``import`` show progress on stderr (a live line on a terminal, a line per layer otherwise;
``-q`` for none).  An error prints its message and hint on stderr and exits 1 (2 for a usage error).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TextIO

from .config import Settings
from .core.errors import SandboxError
from .core.reference import parse_reference
from .images import registry
from .images.store import Store

#: how this command spells the settings it takes as options (in error messages)
CLI_OPTIONS = {
    "data_root": "--data-root",
    "insecure_registries": "--insecure-registry",
    "registry_mirrors": "--registry-mirror",
}


def _settings(args: argparse.Namespace) -> Settings:
    """The settings as the plugin resolves them, with this command's options in place of pytest's."""
    return Settings.resolve(
        options={
            "data_root": args.data_root,
            "insecure_registries": args.insecure_registry,
            "registry_mirrors": args.registry_mirror,
        },
        env=os.environ,
        option_names=CLI_OPTIONS,
    )


def _store(args: argparse.Namespace) -> Store:
    return Store.default(_settings(args))


def _client(args: argparse.Namespace, ref: str) -> registry.RegistryClient:
    host, _ = registry.registry_repository(parse_reference(ref))
    return registry.RegistryClient(host, settings=_settings(args).registries)


def _short(image_id: str) -> str:
    return image_id.removeprefix("sha256:")[:12]


def _ago(created: str) -> str:
    try:
        then = datetime.datetime.fromisoformat(created.replace("Z", "+00:00"))
    except ValueError:
        return created or "-"
    seconds = (datetime.datetime.now(datetime.timezone.utc) - then).total_seconds()
    for unit, length in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= length:
            n = int(seconds // length)
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "just now"


# -- progress (what pull, push and import tell as they go) ---------------------------------------


class Progress:
    """Per-layer progress on a stream: a live line on a terminal, one line per layer otherwise."""

    def __init__(self, stream: TextIO | None = None, *, what: str = "") -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.what = what
        try:
            self.tty = self.stream.isatty()
        except (AttributeError, ValueError):
            self.tty = False

    def _write(self, text: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.stream.write(text)
            self.stream.flush()

    @contextlib.contextmanager
    def layer(
        self, index: int, count: int, digest: str, size: int, verb: str = "pull"
    ) -> Iterator[Callable[[int], None]]:
        label = f"{verb} {self.what} layer {index}/{count} {digest[7:19]}"
        last = [0.0]

        def update(n: int) -> None:
            now = time.monotonic()
            if self.tty and now - last[0] > 0.1:
                last[0] = now
                pct = f" {100 * n // size:3d}%" if size else ""
                self._write(f"\r{label} {human_size(n)}/{human_size(size)}{pct}\x1b[K")

        start = time.monotonic()
        try:
            yield update
        except BaseException:
            if self.tty:
                self._write("\n")  # keep the partial line; the error is printed below it
            raise
        elapsed = time.monotonic() - start
        prefix, suffix = ("\r", "\x1b[K") if self.tty else ("", "")
        self._write(f"{prefix}{label} {human_size(size)} in {elapsed:.1f}s{suffix}\n")

    def note(self, text: str) -> None:
        self._write(f"{text}\n")

    def callback(self, verb: str = "import") -> Callable[[str, int, int], None]:
        """A ``progress(name, bytes_done, bytes_total)`` for :func:`~.images.archive.import_image`:
        a live line on a terminal, and one line per layer (or archive) once it is read."""
        current, start, last = "", 0.0, 0.0

        def update(name: str, done: int, total: int) -> None:
            nonlocal current, start, last
            now = time.monotonic()
            if name != current:
                current, start, last = name, now, 0.0
            short = name[7:19] if name.startswith("sha256:") else os.path.basename(name)
            label = " ".join(w for w in (verb, self.what, short) if w)
            if done >= total:
                prefix, suffix = ("\r", "\x1b[K") if self.tty else ("", "")
                self._write(f"{prefix}{label} {human_size(total)} in {now - start:.1f}s{suffix}\n")
                current = ""
            elif self.tty and now - last > 0.1:
                last = now
                self._write(
                    f"\r{label} {human_size(done)}/{human_size(total)} {100 * done // total:3d}%\x1b[K"
                )

        return update


def human_size(n: int, sep: str = " ") -> str:
    """``1234567`` -> ``1.2 MB`` (decimal units, as Docker prints sizes)."""
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f}{sep}{unit}" if unit == "B" else f"{size:.1f}{sep}{unit}"
        size /= 1000
    return f"{n}{sep}B"  # pragma: no cover


def cmd_images(args: argparse.Namespace, out: TextIO) -> int:
    store = _store(args)
    rows: list[tuple[str, ...]] = []
    images = store.images()
    # As `docker images`: the untagged steps a build or commit went through are left out (-a
    # shows them); an untagged image that is nobody's parent ("dangling") is shown.
    parents = {image.record.parent for image in images}
    for image in images:
        if not args.all and not image.refs and image.id in parents:
            continue
        size = sum(store.layer_info(d).size for d in image.record.layers if store.has_layer(d))
        base = "host+" if image.record.host_base else ""
        for name in image.refs or ("<none>",):
            if args.quiet:
                rows.append((_short(image.id),))
                continue
            repo, _, tag = name.rpartition(":") if name != "<none>" else ("<none>", "", "<none>")
            rows.append(
                (
                    repo,
                    tag,
                    _short(image.id),
                    _ago(image.record.created),
                    f"{base}{len(image.record.layers)}",
                    human_size(size, sep=""),
                )
            )
    if args.quiet:
        seen = dict.fromkeys(r[0] for r in rows)
        out.writelines(f"{i}\n" for i in seen)
        return 0
    header = ("REPOSITORY", "TAG", "IMAGE ID", "CREATED", "LAYERS", "SIZE")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        out.write("   ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")
    return 0


def _shown(ref: str) -> Progress:
    return Progress(sys.stderr, what=str(parse_reference(ref)))


def cmd_pull(args: argparse.Namespace, out: TextIO) -> int:
    result = registry.pull(
        args.ref, _store(args), client=_client(args, args.ref), quiet=args.quiet, progress=_shown(args.ref)
    )
    out.write(f"{result.ref or result.image_id}\n")
    return 0


def cmd_push(args: argparse.Namespace, out: TextIO) -> int:
    result = registry.push(
        args.ref, _store(args), client=_client(args, args.ref), quiet=args.quiet, progress=_shown(args.ref)
    )
    out.write(f"{args.ref}@{result.manifest_digest}\n")
    return 0


def cmd_import(args: argparse.Namespace, out: TextIO) -> int:
    from .images import archive as oci

    show = None if args.quiet else Progress(sys.stderr, what=args.ref or "")
    image_id = oci.import_image(
        args.src, args.ref, store=_store(args), progress=show.callback("import") if show else None
    )
    out.write(f"{args.ref or image_id}\n")
    return 0


def cmd_export(args: argparse.Namespace, out: TextIO) -> int:
    from .images import archive as oci

    oci.export_image(args.ref, args.dst, store=_store(args))
    out.write(f"{args.dst}\n")
    return 0


def cmd_tag(args: argparse.Namespace, out: TextIO) -> int:
    store = _store(args)
    name = store.tag(args.new_ref, store.resolve_id(args.ref))
    out.write(f"{name}\n")
    return 0


def cmd_rmi(args: argparse.Namespace, out: TextIO) -> int:
    store = _store(args)
    for ref in args.refs:
        for name in store.remove(ref):
            out.write(f"Untagged: {name}\n")
    return 0


def cmd_prune(args: argparse.Namespace, out: TextIO) -> int:
    removed = _store(args).prune()
    for digest in removed:
        out.write(f"deleted layer {digest}\n")
    out.write(f"{len(removed)} layer(s) removed\n")
    return 0


def cmd_inspect(args: argparse.Namespace, out: TextIO) -> int:
    store = _store(args)
    docs = []
    for ref in args.refs:
        image_id = store.resolve_id(ref)
        record = store.get_image(image_id)
        doc = {
            "Id": image_id,
            "RepoTags": sorted(n for n, i in store.refs().items() if i == image_id),
            **record.to_json(),
            "Layers": [
                {"digest": d, "path": store.layer_path(d), "size": store.layer_info(d).size}
                for d in record.layers
            ],
        }
        doc.pop("layers", None)
        docs.append(doc)
    json.dump(docs, out, indent=2)
    out.write("\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pytest-sandbox",
        description="Manage the images pytest_sandbox runs: the store, registries, OCI layouts, archives.",
    )
    parser.add_argument(
        "--data-root",
        help="where images are stored (default: $PYTEST_SANDBOX_DATA_ROOT or ~/.cache/pytest-sandbox)",
    )
    parser.add_argument(
        "--insecure-registry",
        action="append",
        default=[],
        metavar="HOST[:PORT]|CIDR",
        help="a registry reached over plain http (repeatable; default $PYTEST_SANDBOX_INSECURE_REGISTRIES)",
    )
    parser.add_argument(
        "--registry-mirror",
        action="append",
        default=[],
        metavar="[ORIGIN=]MIRROR",
        help="a mirror tried before the registry (repeatable; default $PYTEST_SANDBOX_REGISTRY_MIRRORS)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("images", help="list stored images")
    p.add_argument("-q", "--quiet", action="store_true", help="image ids only")
    p.add_argument("-a", "--all", action="store_true", help="also the untagged steps of builds")
    p.set_defaults(func=cmd_images)

    p = sub.add_parser("pull", help="pull an image from a registry")
    p.add_argument("ref", metavar="REF", help="[registry-host[:port]/]name[:tag][@sha256:...]")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("push", help="push a stored image to the registry its name says")
    p.add_argument("ref", metavar="REF", help="registry-host[:port]/name[:tag]")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("import", help="import an OCI layout or a docker-archive")
    p.add_argument("src", metavar="SRC", help="oci:DIR[:TAG] or docker-archive:FILE")
    p.add_argument("ref", metavar="REF", nargs="?", help="the name to give it (default: the archive's own)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("export", help="export an image as an OCI layout or a docker-archive")
    p.add_argument("ref", metavar="REF")
    p.add_argument("dst", metavar="DST", help="oci:DIR[:TAG] or docker-archive:FILE")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("tag", help="give an image another name")
    p.add_argument("ref", metavar="REF")
    p.add_argument("new_ref", metavar="NEWREF")
    p.set_defaults(func=cmd_tag)

    p = sub.add_parser("rmi", help="remove tags (an image goes with its last tag; layers at prune)")
    p.add_argument("refs", metavar="REF", nargs="+")
    p.set_defaults(func=cmd_rmi)

    p = sub.add_parser("prune", help="remove untagged images and the layers nothing uses")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("inspect", help="show images' records as JSON")
    p.add_argument("refs", metavar="REF", nargs="+")
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args, sys.stdout)
    except SandboxError as e:
        sys.stderr.write(f"pytest-sandbox {args.command}: error: {e.message}\n")
        if e.hint:
            sys.stderr.write(f"  hint: {e.hint}\n")
        return 1
    except OSError as e:
        sys.stderr.write(f"pytest-sandbox {args.command}: error: {e}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"pytest-sandbox {args.command}: interrupted\n")
        return 130
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
