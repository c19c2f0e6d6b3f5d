#!/bin/busybox sh
# Stage 1: /init of the VM's initramfs (PID 1, busybox only).  Mounts the host's root read-only
# over virtio-9p with a throw-away tmpfs overlay on top, the shared directory read-write at its
# host path and the Debian kernel's modules, then switch_roots into that root and runs stage 2
# (run.sh) there.  The host writes the job directory (tag "job"): vars, command, status.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
fail() { echo "vm init: $*"; poweroff -f; }

# Dependencies first, in the order the host wrote (modules.dep, topologically sorted).
while read -r module; do insmod "/lib/modules/$module" || fail "insmod $module"; done < /boot-modules

# msize: 256 KiB messages instead of 8 KiB, the biggest win for 9p throughput.
P9=trans=virtio,version=9p2000.L,msize=262144
mount -t 9p -o $P9,cache=none job /job || fail "mount the job directory"
. /job/vars  # SHARE, MODULES, TTY
# cache=loose: the host root does not change under the VM while it runs (and the guest's
# writes go to the overlay), so the guest may cache it; the shared directory may change.
mount -t 9p -o $P9,cache=loose,ro root /lower || fail "mount the host root"
mount -t tmpfs -o mode=0755 tmpfs /upper
mkdir -p /upper/data /upper/work
mount -t overlay -o lowerdir=/lower,upperdir=/upper/data,workdir=/upper/work overlay /newroot \
    || fail "mount the root overlay"

R=/newroot
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
# The unified hierarchy, mounted as systemd mounts it (nsdelegate: a cgroup namespace is a
# delegation boundary; memory_recursiveprot: memory.min/low protect the whole subtree).
mount -t cgroup2 -o nsdelegate,memory_recursiveprot cgroup2 $R/sys/fs/cgroup || fail "mount cgroup2"
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o gid=5,mode=0620,ptmxmode=0666 devpts $R/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm
mount -t tmpfs -o mode=0755 tmpfs $R/run
mount -t tmpfs -o mode=1777 tmpfs $R/tmp
mkdir -p "$R$SHARE" && mount -t 9p -o $P9,cache=mmap share "$R$SHARE" || fail "mount $SHARE"
# The Debian kernel's modules live in the host's cache, never in the host's /lib/modules.
KVER=$(uname -r)
mkdir -p "$R/lib/modules/$KVER" && mount --bind "/lower$MODULES" "$R/lib/modules/$KVER" \
    || fail "bind the modules"

mkdir -p $R/run/vm/job
mount --move /job $R/run/vm/job
cp /bin/busybox /run.sh $R/run/vm/
ln -s busybox $R/run/vm/modprobe
cd /
exec switch_root $R /run/vm/busybox sh /run/vm/run.sh
fail "switch_root failed"
