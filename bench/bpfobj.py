"""A compiled BPF ELF object (clang -target bpf), loaded with Debian's libbpf1 through ctypes.

For the bench's reference program only (Katran's balancer.bpf.o): lb's own data plane is
compiled by bcc. Maps and programs live as long as the object; close() releases them."""
from __future__ import annotations

import ctypes
import ctypes.util
import os

_OPEN_FAILED = "cannot open BPF object"


def _libbpf() -> ctypes.CDLL:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as e:
        raise RuntimeError(f"libbpf not found ({e}); install Debian's libbpf1 (make setup does)") from None
    p = ctypes.c_void_p
    for fn, res, args in (
        ("bpf_object__open_file", p, [ctypes.c_char_p, p]),
        ("libbpf_get_error", ctypes.c_long, [p]),
        ("bpf_object__load", ctypes.c_int, [p]),
        ("bpf_object__close", None, [p]),
        ("bpf_object__find_program_by_name", p, [p, ctypes.c_char_p]),
        ("bpf_program__fd", ctypes.c_int, [p]),
        ("bpf_object__find_map_by_name", p, [p, ctypes.c_char_p]),
        ("bpf_map__fd", ctypes.c_int, [p]),
        ("bpf_map__max_entries", ctypes.c_uint32, [p]),
        ("bpf_map__set_max_entries", ctypes.c_int, [p, ctypes.c_uint32]),
        ("bpf_map_create", ctypes.c_int, [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint32,
                                          ctypes.c_uint32, p]),
    ):
        f = getattr(lib, fn)
        f.restype, f.argtypes = res, args
    return lib


class BpfObject:
    """`with BpfObject(path) as obj:` -- obj.program_fd(name), obj.map_fd(name)."""

    def __init__(self, path: str, max_entries: dict[str, int] | None = None) -> None:
        self.lib = _libbpf()
        self.path = path
        self.created: list[int] = []
        obj = self.lib.bpf_object__open_file(os.fsencode(path), None)
        if not obj or self.lib.libbpf_get_error(obj):
            raise RuntimeError(f"{path}: {_OPEN_FAILED} (not a BPF ELF object?)")
        self.obj = ctypes.c_void_p(obj)
        try:
            for name, entries in (max_entries or {}).items():
                self.lib.bpf_map__set_max_entries(self._map(name), entries)
            rc = self.lib.bpf_object__load(self.obj)
            if rc:
                raise RuntimeError(f"{path}: the kernel refused to load it: {os.strerror(-rc)}")
        except BaseException:
            self.close()
            raise

    def _map(self, name: str) -> ctypes.c_void_p:
        m = self.lib.bpf_object__find_map_by_name(self.obj, name.encode())
        if not m:
            raise KeyError(f"{self.path}: no map {name!r}")
        return ctypes.c_void_p(m)

    def program_fd(self, name: str) -> int:
        prog = self.lib.bpf_object__find_program_by_name(self.obj, name.encode())
        if not prog:
            raise KeyError(f"{self.path}: no program {name!r}")
        return self.lib.bpf_program__fd(ctypes.c_void_p(prog))

    def map_fd(self, name: str) -> int:
        return self.lib.bpf_map__fd(self._map(name))

    def max_entries(self, name: str) -> int:
        return self.lib.bpf_map__max_entries(self._map(name))

    def create_map(self, map_type: int, name: str, key_size: int, value_size: int, max_entries: int) -> int:
        """A map outside the object (an inner map for a map-in-map), closed with the object."""
        fd = self.lib.bpf_map_create(map_type, name.encode()[:15], key_size, value_size, max_entries, None)
        if fd < 0:
            raise OSError(-fd, f"creating map {name}: {os.strerror(-fd)}")
        self.created.append(fd)
        return fd

    def close(self) -> None:
        for fd in self.created:
            os.close(fd)
        self.created = []
        if self.obj:
            self.lib.bpf_object__close(self.obj)
            self.obj = None

    def __enter__(self) -> "BpfObject":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
