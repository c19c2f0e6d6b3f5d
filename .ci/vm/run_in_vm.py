#!/usr/bin/env python3
"""Run one command in a throw-away QEMU VM whose kernel has a pure cgroup v2 hierarchy.

    .ci/vm/run_in_vm.py [--share DIR] [--timeout SECS] [--user NAME] -- COMMAND [ARGS...]

The VM boots Debian 12's stock kernel with ``cgroup_no_v1=all``.  Its root filesystem is the
host's own ``/`` (virtio-9p, read-only, under a tmpfs overlay: the guest may write, the host does
not change); DIR (default: the current directory) is mounted read-write at the same path.  The
command runs as root (or NAME) with the caller's environment and working directory; its output
(stdout and stderr merged) streams to stdout, and the runner exits with its status: 124 after
``--timeout``, 125 when the VM itself failed.  ``cgroup2`` is on ``/sys/fs/cgroup`` with every
controller enabled in the root's ``cgroup.subtree_control``; there is no systemd.

Host side (Debian 12, x86_64, root): ``qemu-system-x86`` and ``seabios`` are installed with
apt-get if missing.  Debian's ``linux-image-amd64`` (resolved to the concrete
``linux-image-<abi>-amd64``) and ``busybox-static`` are fetched with ``apt-get download`` and
unpacked into the cache directory ($PYTEST_SANDBOX_VM_CACHE, default /var/cache/pytest-sandbox-vm;
never /boot or /lib/modules).  The kernel stays pinned until that directory is deleted.  The
guest's two boot stages are the shell scripts next to this file: init.sh (the initramfs) and
run.sh (PID 1 after switch_root).

Why Python and not bash: the job has structure that later work extends (booting systemd,
unprivileged users), and the stdlib gives what bash needs helpers for -- exact shell quoting of
the environment, xz decompression, a lock, a timeout that kills the VM and cleans up.

KVM is used only when it can run a stock kernel (kvm_intel or kvm_amd loaded): nested "PVM" KVM
(kvm_pvm) exposes /dev/kvm but stops stock kernels with an emulation failure, so such hosts use
TCG (pure emulation: `-- true` takes 7-14 s, Python runs 10-30x slower than native).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import lzma
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = "/var/cache/pytest-sandbox-vm"
EXIT_TIMEOUT = 124
EXIT_VM_FAILED = 125
# What the initramfs needs before the host root is reachable (their dependencies come along).
BOOT_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
# Driver trees useless in this VM: dropping them keeps the cache at ~160 MB instead of ~400 MB.
# fmt: off
UNUSED_MODULE_TREES = (
    "sound", "net/wireless", "net/mac80211", "net/bluetooth", "drivers/gpu", "drivers/media",
    "drivers/infiniband", "drivers/iio", "drivers/staging", "drivers/usb", "drivers/hid",
    "drivers/input", "drivers/scsi", "drivers/ata", "drivers/mtd", "drivers/comedi",
    "drivers/bluetooth", "drivers/isdn", "drivers/hwmon", "drivers/platform", "drivers/video",
    "drivers/target", "drivers/net/wireless", "drivers/net/ethernet", "drivers/net/can",
    "drivers/net/usb",
)
# fmt: on
KERNEL_CMDLINE = (
    "console=ttyS0 rdinit=/init panic=-1 cgroup_no_v1=all "
    # speed under emulation: no Spectre workarounds, no entropy wait, no crypto self-tests
    "mitigations=off random.trust_cpu=on nowatchdog cryptomgr.notests"
)
# Not copied into the guest: they describe the caller's shell or session, not the command.
SKIPPED_ENV = {"PWD", "OLDPWD", "SHLVL", "_", "DISPLAY", "XAUTHORITY", "DBUS_SESSION_BUS_ADDRESS"}


class VmError(Exception):
    """The VM could not be prepared or did not report the command's status."""


def say(message: str) -> None:
    print(f"run_in_vm: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ host packages


def apt_get(*args: str, cwd: Path | None = None) -> None:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "-q", *args], cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL)


def with_fresh_lists(what: str, *args: str, cwd: Path | None = None) -> None:
    """apt-get ARGS; on failure the package lists may be missing or stale: update, try again."""
    try:
        apt_get(*args, cwd=cwd)
    except subprocess.CalledProcessError:
        try:
            apt_get("update")
            apt_get(*args, cwd=cwd)
        except subprocess.CalledProcessError as e:
            raise VmError(f"{what} failed: {e}") from None


def ensure_host_packages() -> None:
    missing = []
    if shutil.which("qemu-system-x86_64") is None:
        missing.append("qemu-system-x86")
    if not Path("/usr/share/seabios/bios-256k.bin").exists():
        missing.append("seabios")  # only recommended by qemu-system-x86, and QEMU needs a BIOS
    if missing:
        say(f"installing {' '.join(missing)} with apt-get")
        with_fresh_lists("apt-get install", "install", "-y", "--no-install-recommends", *missing)


def download_unpacked(package: str, into: Path) -> Path:
    """The files of Debian package PACKAGE, unpacked under INTO/files (nothing is installed)."""
    debs = into / "debs"
    debs.mkdir()
    # APT's sandbox user _apt cannot write to a root-only directory: download as root.
    as_root = ("-o", "APT::Sandbox::User=root")
    with_fresh_lists(f"apt-get download {package}", "download", *as_root, package, cwd=debs)
    (deb,) = debs.glob("*.deb")
    files = into / "files"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(files)], check=True)
    return files


def concrete_kernel_package() -> str:
    """linux-image-amd64 is a metapackage: the package that has the kernel is what it depends on."""

    def lookup() -> str | None:
        out = subprocess.run(
            ["apt-cache", "depends", "--no-recommends", "--no-suggests", "linux-image-amd64"],
            check=False,  # no match is handled below
            capture_output=True,
            text=True,
        ).stdout
        found = re.search(r"Depends: (linux-image-\d\S*)", out)
        return found[1] if found else None

    package = lookup()
    if package is None:
        apt_get("update")
        package = lookup()
    if package is None:
        raise VmError("apt-cache does not know linux-image-amd64 (is this Debian?)")
    return package


# ---------------------------------------------------------------------------------- the cache


@dataclass(frozen=True)
class Kernel:
    version: str
    image: Path  # an uncompressed ELF vmlinux when extraction worked, else the bzImage
    modules: Path  # what the guest mounts on /lib/modules/<version>


@contextlib.contextmanager
def locked(cache: Path) -> Iterator[None]:
    """One runner at a time prepares the cache; the others wait and then find it ready."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for partial in cache.glob(".partial-*"):  # left by a runner that was killed (SIGKILL)
            shutil.rmtree(partial)
        yield


def partial(cache: Path) -> tempfile.TemporaryDirectory[str]:
    """Where the next cache entry is built, to be renamed into place when complete (atomic)."""
    return tempfile.TemporaryDirectory(prefix=".partial-", dir=cache)


def busybox_in(cache: Path) -> Path:
    busybox = cache / "busybox"
    if not busybox.exists():
        say(f"downloading busybox-static into {cache}")
        with partial(cache) as tmp:
            files = download_unpacked("busybox-static", Path(tmp))
            found = next(p for p in (files / "bin/busybox", files / "usr/bin/busybox") if p.exists())
            os.rename(found, busybox)
    return busybox


def kernel_in(cache: Path, busybox: Path) -> Kernel:
    kdir = cache / "kernel"
    if not kdir.exists():
        package = concrete_kernel_package()
        say(f"downloading {package} into {cache} (once: it stays until that directory is deleted)")
        with partial(cache) as tmp:
            build_kernel_dir(download_unpacked(package, Path(tmp)), busybox, Path(tmp) / "kernel")
            os.rename(Path(tmp) / "kernel", kdir)
    version = (kdir / "version").read_text().strip()
    image = kdir / "vmlinux" if (kdir / "vmlinux").exists() else kdir / "vmlinuz"  # see elf_kernel
    return Kernel(version, image, kdir / "modules")


def build_kernel_dir(files: Path, busybox: Path, kdir: Path) -> None:
    (bzimage,) = (files / "boot").glob("vmlinuz-*")
    version = bzimage.name.removeprefix("vmlinuz-")
    modules = next(p for p in (files / "lib/modules", files / "usr/lib/modules") if p.exists()) / version
    for tree in UNUSED_MODULE_TREES:
        shutil.rmtree(modules / "kernel" / tree, ignore_errors=True)
    # busybox's depmod, as the guest's modprobe is busybox's: the host may have no kmod at all
    subprocess.run([str(busybox), "depmod", "-b", str(modules.parent.parent.parent), version], check=True)
    kdir.mkdir()
    shutil.move(str(modules), kdir / "modules")
    vmlinux = elf_kernel(bzimage.read_bytes())
    if vmlinux is None:
        shutil.copy(bzimage, kdir / "vmlinuz")
    else:
        (kdir / "vmlinux").write_bytes(vmlinux)
    (kdir / "version").write_text(version + "\n")


def elf_kernel(bzimage: bytes) -> bytes | None:
    """The ELF kernel inside an xz-compressed bzImage, or None.

    QEMU boots an ELF kernel directly through its PVH entry point, skipping the decompressor:
    about 5 s under TCG.  Debian builds with CONFIG_KERNEL_XZ and CONFIG_PVH.
    """
    start = bzimage.find(b"\xfd7zXZ\x00")
    if start < 0:
        return None
    try:
        # the decompressor stops at the end of the xz stream; what follows the stream is ignored
        elf = lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(bzimage[start:])
    except lzma.LZMAError:
        return None
    return elf if elf.startswith(b"\x7fELF") else None


def boot_module_paths(modules: Path) -> list[str]:
    """BOOT_MODULES and what they need, dependencies first (paths relative to MODULES)."""
    deps: dict[str, list[str]] = {}
    for line in (modules / "modules.dep").read_text().splitlines():
        name, _, needs = line.partition(":")
        deps[name] = needs.split()
    by_module = {Path(path).name.removesuffix(".ko").replace("-", "_"): path for path in deps}
    ordered: list[str] = []

    def visit(path: str) -> None:
        if path not in ordered:
            for dep in deps[path]:
                visit(dep)
            ordered.append(path)

    for module in BOOT_MODULES:
        if module in by_module:  # absent: built into this kernel
            visit(by_module[module])
    return ordered


def initramfs_in(cache: Path, kernel: Kernel, busybox: Path) -> Path:
    """A busybox initramfs with init.sh, run.sh and the boot modules (3 MB), rebuilt on change."""
    digest = hashlib.sha256(" ".join(BOOT_MODULES).encode())
    for part in (busybox, HERE / "init.sh", HERE / "run.sh"):
        digest.update(part.read_bytes())
    image = kernel.modules.parent / f"initramfs-{digest.hexdigest()[:12]}.cpio"
    if image.exists():
        return image
    with partial(cache) as tmp:
        root = Path(tmp) / "root"
        for d in ("bin", "proc", "sys", "dev", "job", "lower", "upper", "newroot", "lib/modules"):
            (root / d).mkdir(parents=True)
        shutil.copy(busybox, root / "bin/busybox")
        shutil.copy(HERE / "init.sh", root / "init")
        shutil.copy(HERE / "run.sh", root / "run.sh")
        (root / "init").chmod(0o755)
        paths = boot_module_paths(kernel.modules)
        for path in paths:
            (root / "lib/modules" / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(kernel.modules / path, root / "lib/modules" / path)
        (root / "boot-modules").write_text("".join(p + "\n" for p in paths))
        names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        with open(Path(tmp) / "image", "wb") as out:
            cpio = [str(busybox), "cpio", "-o", "-H", "newc"]
            subprocess.run(cpio, input="\n".join(names).encode(), stdout=out, cwd=root, check=True)
        for stale in image.parent.glob("initramfs-*.cpio"):
            stale.unlink()
        os.rename(Path(tmp) / "image", image)
    return image


def prepare(cache: Path) -> tuple[Kernel, Path]:
    with locked(cache):
        ensure_host_packages()
        busybox = busybox_in(cache)
        kernel = kernel_in(cache, busybox)
        return kernel, initramfs_in(cache, kernel, busybox)


# ------------------------------------------------------------------------------------ the job


@dataclass(frozen=True)
class Job:
    command: Sequence[str]
    share: Path  # mounted read-write at the same path
    cwd: Path
    env: dict[str, str]
    user: pwd.struct_passwd | None  # None: root
    tty: bool  # the host's stdout is a terminal, so the command gets one too


def command_script(job: Job) -> str:
    """The POSIX sh script the guest runs: the caller's environment, cwd and command."""
    env = dict(job.env)
    argv = list(job.command)
    if job.user is not None:
        env.update(HOME=job.user.pw_dir, USER=job.user.pw_name, LOGNAME=job.user.pw_name)
        ids = [f"--reuid={job.user.pw_uid}", f"--regid={job.user.pw_gid}", "--init-groups"]
        argv = ["setpriv", *ids, "--", *argv]
    lines = [
        f"export {name}={shlex.quote(value)}"
        for name, value in sorted(env.items())
        if name not in SKIPPED_ENV and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name)
    ]
    lines.append(f"cd -- {shlex.quote(str(job.cwd))} || exit {EXIT_VM_FAILED}")
    lines.append(f"exec {shlex.join(argv)}")
    return "\n".join(lines) + "\n"


def write_job(jobdir: Path, job: Job, kernel: Kernel) -> None:
    """The job directory, shared with the guest: what init.sh and run.sh read, and the status."""
    variables = {"SHARE": str(job.share), "MODULES": str(kernel.modules), "TTY": "1" if job.tty else "0"}
    (jobdir / "vars").write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in variables.items()))
    (jobdir / "command").write_text(command_script(job))


# ------------------------------------------------------------------------------------- the VM


def accelerator(choice: str) -> list[str]:
    if choice == "auto":
        # /dev/kvm alone is not enough (nested PVM KVM cannot run stock kernels): only real
        # hardware virtualisation counts
        hardware = any(Path(f"/sys/module/{m}").exists() for m in ("kvm_intel", "kvm_amd"))
        choice = "kvm" if hardware and os.access("/dev/kvm", os.W_OK) else "tcg"
    if choice == "kvm":
        return ["-accel", "kvm", "-cpu", "host"]
    return ["-accel", "tcg,thread=multi", "-cpu", "max"]


def qemu_command(kernel: Kernel, initramfs: Path, jobdir: Path, args: argparse.Namespace) -> list[str]:
    def escape(path: Path) -> str:
        return str(path).replace(",", ",,")  # QEMU option values escape commas by doubling

    def virtfs(path: Path, tag: str, *extra: str) -> list[str]:
        # multidevs=remap: the host root spans several filesystems; keep inode numbers unique
        options = [f"local,path={escape(path)}", f"mount_tag={tag}", "security_model=none", *extra]
        return ["-virtfs", ",".join(options)]

    return [
        "qemu-system-x86_64", "-M", "q35", *accelerator(args.accel), "-m", args.mem, "-smp", str(args.cpus),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(kernel.image), "-initrd", str(initramfs), "-append", KERNEL_CMDLINE,
        # ttyS0: the kernel's console, to a file (shown on failure); ttyS1: the command's output
        "-chardev", f"file,id=console,path={escape(jobdir / 'console.log')}", "-serial", "chardev:console",
        "-chardev", "stdio,id=out,signal=off", "-serial", "chardev:out",
        *virtfs(Path("/"), "root", "readonly=on", "multidevs=remap"),
        *virtfs(args.share, "share", "multidevs=remap"),
        *virtfs(jobdir, "job"),
    ]  # fmt: skip


def run_vm(qemu: list[str], jobdir: Path, timeout: float | None, verbose: bool) -> int:
    with open(jobdir / "qemu.log", "wb") as qemu_log:
        vm = subprocess.Popen(qemu, stdin=subprocess.DEVNULL, stderr=qemu_log)
        try:
            vm.wait(timeout)
        except subprocess.TimeoutExpired:
            say(f"timed out after {timeout:g} s")
            return EXIT_TIMEOUT
        finally:
            if vm.poll() is None:  # timeout, ^C or any error here: the VM never outlives us
                vm.kill()
                vm.wait()
    console = (jobdir / "console.log").read_text(errors="replace")
    if verbose:
        print(console, file=sys.stderr)
    status = jobdir / "status"
    if status.exists():
        return int(status.read_text())
    tail = "\n".join(console.splitlines()[-30:])
    qemu_errors = (jobdir / "qemu.log").read_text(errors="replace")
    raise VmError(f"the VM reported no exit status (qemu exit {vm.returncode})\n{qemu_errors}{tail}")


# ------------------------------------------------------------------------------------ the CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        say(message)
        sys.exit(EXIT_VM_FAILED)  # not argparse's 2, which the command itself may return


def parse(argv: Sequence[str]) -> argparse.Namespace:
    p = _Parser(description=(__doc__ or "").split("\n\n")[0], prog=".ci/vm/run_in_vm.py")
    p.add_argument("--share", type=Path, default=Path.cwd(), help="mounted read-write (default: cwd)")
    p.add_argument("--timeout", type=float, help="kill the VM after this many seconds (exit 124)")
    p.add_argument("--user", help="run the command as this user instead of root")
    p.add_argument("--mem", default="2G", help="guest memory (default 2G)")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="guest CPUs (default: the host's)")
    p.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    p.add_argument("--verbose", action="store_true", help="show the guest kernel's console")
    p.add_argument("--prepare", action="store_true", help="fill the cache and exit (to warm a CI cache)")
    p.add_argument("command", nargs="*", help="the command and its arguments (after --)")
    args = p.parse_args(argv)
    if not args.command and not args.prepare:
        p.error("no command given")
    return args


def main(argv: Sequence[str]) -> int:
    args = parse(argv)
    if os.geteuid() != 0:
        raise VmError("run as root (QEMU exports the host root; apt-get installs and downloads)")
    try:
        user = pwd.getpwnam(args.user) if args.user else None
    except KeyError:
        raise VmError(f"no user {args.user!r}") from None
    args.share = args.share.resolve()
    if args.share == Path("/"):
        raise VmError("--share / is not supported (the whole host root is visible read-only anyway)")
    cache = Path(os.environ.get("PYTEST_SANDBOX_VM_CACHE", DEFAULT_CACHE)).resolve()
    kernel, initramfs = prepare(cache)
    if args.prepare:
        say(f"ready: kernel {kernel.version} in {cache}")
        return 0
    job = Job(args.command, args.share, Path.cwd(), dict(os.environ), user, sys.stdout.isatty())
    with tempfile.TemporaryDirectory(prefix="pytest-sandbox-vm.") as tmp:
        jobdir = Path(tmp)
        write_job(jobdir, job, kernel)
        sys.stdout.flush()  # QEMU writes to the same stdout
        qemu = qemu_command(kernel, initramfs, jobdir, args)
        return run_vm(qemu, jobdir, args.timeout, args.verbose)


if __name__ == "__main__":
    # SIGTERM (a CI job cancelled) unwinds like ^C does: the VM is killed, the job dir removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        sys.exit(main(sys.argv[1:]))
    except VmError as e:
        say(f"error: {e}")
        sys.exit(EXIT_VM_FAILED)
    except KeyboardInterrupt:
        sys.exit(130)
