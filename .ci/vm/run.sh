# Stage 2: PID 1 in the host's root (switched to by init.sh), run by /run/vm/busybox sh.
# Prepares the machine as a cgroup v2 host would be, runs the job's command with its output on
# the second serial port (the host's stdout), writes its exit status to the job directory and
# powers off.  There is no systemd: the command runs as a child of this script, in the root cgroup.
B=/run/vm/busybox
J=/run/vm/job
. $J/vars
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# The host userspace may have no kmod: the kernel's on-demand loads (veth, bridge...) use busybox.
echo /run/vm/modprobe > /proc/sys/kernel/modprobe
$B mount --make-rshared /  # as systemd leaves it: mount events propagate by default
$B hostname pytest-sandbox-vm
echo "127.0.1.1 pytest-sandbox-vm" >> /etc/hosts
$B ip link set lo up
# Every controller available to children of the root, as on a systemd host.
for c in $(cat /sys/fs/cgroup/cgroup.controllers); do echo "+$c" > /sys/fs/cgroup/cgroup.subtree_control; done

# raw: no \n -> \r\n translation and no echo, so the host gets the bytes the command wrote.
$B stty -F /dev/ttyS1 raw -echo
if [ "$TTY" = 1 ]; then
    /bin/sh $J/command </dev/null >/dev/ttyS1 2>&1
    echo $? > $J/status
else
    # The host's stdout is not a terminal: give the command a pipe, not a tty, either.
    { /bin/sh $J/command </dev/null 2>&1; echo $? > $J/status; } | $B cat > /dev/ttyS1
fi
$B sync
$B poweroff -f
