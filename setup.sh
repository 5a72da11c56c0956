#!/usr/bin/env bash
# One-command set-up for lb: Debian packages, kernel headers for bcc, bpffs, and the project venv.
# Idempotent: every step checks first and only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")"

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (loading XDP programs needs CAP_BPF and CAP_NET_ADMIN); try: sudo make setup"
[ -e /proc/sys/kernel/unprivileged_bpf_disabled ] || die "this kernel has no BPF syscall (CONFIG_BPF_SYSCALL); lb cannot run here"
[ -e /sys/kernel/btf/vmlinux ] || say "notice: kernel has no BTF (/sys/kernel/btf/vmlinux); continuing"

packages=(python3-bpfcc bpfcc-tools libbpf1 iproute2 ethtool python3-venv python3-pip gcc libc6-dev linux-libc-dev nftables wrk nginx-light etcd-server exabgp bird2)
missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done

kver=$(uname -r)
kbuild=/lib/modules/$kver/build
if [ ! -e "$kbuild/include" ] && ! apt-cache show "linux-headers-$kver" >/dev/null 2>&1; then
	dpkg-query -W -f='${Status}' linux-headers-amd64 2>/dev/null | grep -q 'install ok installed' || missing+=(linux-headers-amd64)
fi

if ((${#missing[@]})); then
	say "installing Debian packages: ${missing[*]}"
	apt-get update -q
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

# bcc compiles against /lib/modules/$(uname -r)/build. Prefer the running kernel's own headers.
if [ ! -e "$kbuild/include" ]; then
	if apt-cache show "linux-headers-$kver" >/dev/null 2>&1; then
		say "installing linux-headers-$kver for the running kernel"
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q "linux-headers-$kver"
	else
		arch_dir=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
		common_dir=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
		[ -n "$arch_dir" ] && [ -n "$common_dir" ] || die "no kernel headers for $kver and no Debian generic headers under /usr/src"
		say "notice: kernel $kver has no headers package; linking Debian's generic headers for bcc:"
		say "  $kbuild -> $arch_dir"
		say "  /lib/modules/$kver/source -> $common_dir"
		mkdir -p "/lib/modules/$kver"
		ln -sfn "$arch_dir" "$kbuild"
		ln -sfn "$common_dir" "/lib/modules/$kver/source"
	fi
fi

# The data plane pins its maps in bpffs; make sure the standard mount exists.
if ! mountpoint -q /sys/fs/bpf; then
	say "mounting bpffs at /sys/fs/bpf"
	mount -t bpf bpf /sys/fs/bpf
fi

# `ip netns exec` replaces /sys, hiding /sys/fs/bpf: lb reaches the same bpffs
# through a bind mount under /run, which every `ip netns exec` call keeps.
if ! mountpoint -q /run/lb/bpffs; then
	say "bind-mounting /sys/fs/bpf at /run/lb/bpffs (stays visible inside 'ip netns exec')"
	mkdir -p /run/lb/bpffs
	mount --bind /sys/fs/bpf /run/lb/bpffs
fi

# bcc's Python module lives in Debian's dist-packages: the venv must see system site-packages.
if [ ! -x .venv/bin/python ]; then
	say "creating .venv from /usr/bin/python3 (with system site-packages, for bcc)"
	/usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.installed
if [ ! -e "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
	say "installing the project into .venv"
	.venv/bin/pip install -q --disable-pip-version-check -e '.[test,bench]'
	touch "$stamp"
fi
# The Maglev fill loop in C (lb/maglev.py uses it when present and falls back to Python).
if [ ! -e lb/_maglev_fill.so ] || [ lb/maglev_fill.c -nt lb/_maglev_fill.so ]; then
	say "building lb/_maglev_fill.so"
	gcc -O2 -Wall -shared -fPIC -o lb/_maglev_fill.so lb/maglev_fill.c
fi
.venv/bin/python -c 'import bcc, pyroute2, scapy, yaml, prometheus_client, etcd3gw' || die "the venv cannot import bcc, pyroute2, scapy, yaml, prometheus_client and etcd3gw"
say "ready"
