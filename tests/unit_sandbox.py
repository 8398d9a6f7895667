"""Run a command under the system-call restrictions of systemd/gatewayd.service, without systemd.

There is no systemd as PID 1 on the test machines, so ``systemd-run -p ...`` cannot apply the
unit. This applies, with libseccomp (ctypes; ``libseccomp2`` comes with Debian's systemd), the
parts of the unit that can break gatewayd and its plugins, then execs the command:

- ``SystemCallFilter=`` lines: the allow-list, expanded with ``systemd-analyze syscall-filter``
  (the groups of the installed systemd), minus the ``~`` lines; others fail with
  ``SystemCallErrorNumber=`` (EPERM), as systemd does.
- ``MemoryDenyWriteExecute=yes``: both ways systemd implements it. The seccomp rules of systemd
  ≤ 254 (no mmap with PROT_WRITE|PROT_EXEC, no mprotect/pkey_mprotect adding PROT_EXEC, no shmat
  with SHM_EXEC: the stricter), and the kernel's ``prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN)``
  (Linux ≥ 6.3; systemd ≥ 255 uses it where it can) when the kernel has it.
- ``RestrictAddressFamilies=``: socket() of any other family fails with EAFNOSUPPORT.
- ``NoNewPrivileges=yes`` (seccomp needs it anyway).

Not applied (they need systemd or root, and do not limit what the process may call): the file
system and namespace options (ProtectSystem, PrivateTmp, PrivateMounts, ...), DynamicUser, the
capability sets, IPAddressDeny, DevicePolicy.

Usage: ``python tests/unit_sandbox.py systemd/gatewayd.service -- COMMAND [ARG...]``;
``--report`` prints what was applied (as JSON on stderr) before the exec.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

PR_SET_MDWE, PR_GET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 66, 1
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_EQ, SCMP_CMP_GE, SCMP_CMP_MASKED_EQ = 4, 5, 7
PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000
AF_MAX = 64  # above every family Linux defines (46 in 6.x)


def scmp_act_errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


@dataclass
class UnitRestrictions:
    """The system-call parts of a unit file, as systemd reads them (later lines add or reset)."""

    allow: set[str] | None = None  # None: no allow-list
    deny: set[str] = field(default_factory=set)
    errno_name: str = "EPERM"
    mdwe: bool = False
    families: set[str] | None = None
    filter_lines: list[str] = field(default_factory=list)


def expand(group_or_call: str, analyze: str) -> set[str]:
    """System calls of a ``@group`` (recursively, via systemd-analyze), or the name itself."""
    if not group_or_call.startswith("@"):
        return {group_or_call}
    out = subprocess.run(
        [analyze, "syscall-filter", "--no-pager", group_or_call],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    calls: set[str] = set()
    for line in out.splitlines()[1:]:
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        calls |= expand(item, analyze)
    return calls


def read_unit(path: Path, analyze: str) -> UnitRestrictions:
    r = UnitRestrictions()
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith(("#", ";")) or "=" not in line:
            continue
        key, _, value = (s.strip() for s in line.partition("="))
        if key == "SystemCallFilter":
            r.filter_lines.append(value)
            invert = value.startswith("~")
            names: set[str] = set()
            for item in value.lstrip("~").split():
                names |= expand(item, analyze)
            if invert:
                if r.allow is not None:
                    r.allow -= names  # systemd: a ~ line after an allow-list removes from it
                else:
                    r.deny |= names
            elif r.allow is None:
                r.allow = names
            else:
                r.allow |= names
        elif key == "SystemCallErrorNumber":
            r.errno_name = value
        elif key == "MemoryDenyWriteExecute":
            r.mdwe = value.lower() in ("yes", "true", "1", "on")
        elif key == "RestrictAddressFamilies":
            r.families = set(value.split()) if value else None
    return r


class Seccomp:
    """The few libseccomp calls needed, through ctypes."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
        self.lib = ctypes.CDLL(name, use_errno=True)
        self.lib.seccomp_init.restype = ctypes.c_void_p
        self.lib.seccomp_init.argtypes = [ctypes.c_uint32]
        self.lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        self.lib.seccomp_rule_add_array.argtypes = [
            ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(_ArgCmp)
        ]  # fmt: skip
        self.lib.seccomp_load.argtypes = [ctypes.c_void_p]
        self.lib.seccomp_release.argtypes = [ctypes.c_void_p]

    def nr(self, name: str) -> int | None:
        n = int(self.lib.seccomp_syscall_resolve_name(name.encode()))
        return None if n < 0 else n  # not a system call of this architecture

    def load(self, default: int, rules: list[tuple[int, str, list[tuple[int, int, int, int]]]]) -> int:
        """Load one filter; ``rules`` are (action, syscall, [(arg, op, a, b), ...]). Returns rules added."""
        ctx = self.lib.seccomp_init(default)
        if not ctx:
            raise OSError("seccomp_init failed")
        added = 0
        try:
            for action, name, conds in rules:
                nr = self.nr(name)
                if nr is None:
                    continue
                arr = (_ArgCmp * max(1, len(conds)))(*(_ArgCmp(*c) for c in conds))
                rc = self.lib.seccomp_rule_add_array(ctx, action, nr, len(conds), arr)
                if rc < 0:
                    raise OSError(-rc, f"seccomp_rule_add {name}: {os.strerror(-rc)}")
                added += 1
            rc = self.lib.seccomp_load(ctx)
            if rc < 0:
                raise OSError(-rc, f"seccomp_load: {os.strerror(-rc)}")
        finally:
            self.lib.seccomp_release(ctx)
        return added


def prctl_mdwe() -> str:
    """The kernel's MDWE for this process and its children; what happened, in words."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        return f"unavailable ({os.strerror(ctypes.get_errno())}; Linux >= 6.3 has it)"
    return "on" if libc.prctl(PR_GET_MDWE, 0, 0, 0, 0) & PR_MDWE_REFUSE_EXEC_GAIN else "not kept"


def apply(unit: Path) -> dict[str, object]:
    """Apply the unit's system-call restrictions to this process (and so to what it execs)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        raise RuntimeError("systemd-analyze is missing (Debian package systemd)")
    r = read_unit(unit, analyze)
    sc = Seccomp()
    report: dict[str, object] = {"SystemCallFilter": r.filter_lines}
    deny_action = scmp_act_errno(getattr(errno, r.errno_name))
    if r.families is not None:
        allowed = {int(getattr(socket, f)) for f in r.families}
        eafns = scmp_act_errno(errno.EAFNOSUPPORT)
        fam_rules = [(eafns, "socket", [(0, SCMP_CMP_EQ, f, 0)]) for f in range(AF_MAX) if f not in allowed]
        fam_rules.append((eafns, "socket", [(0, SCMP_CMP_GE, AF_MAX, 0)]))
        sc.load(SCMP_ACT_ALLOW, fam_rules)
        report["RestrictAddressFamilies"] = sorted(r.families)
    if r.mdwe:
        wx = PROT_WRITE | PROT_EXEC
        mdwe_rules = [
            (deny_action, "mmap", [(2, SCMP_CMP_MASKED_EQ, wx, wx)]),
            (deny_action, "mmap2", [(2, SCMP_CMP_MASKED_EQ, wx, wx)]),
            (deny_action, "mprotect", [(2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC)]),
            (deny_action, "pkey_mprotect", [(2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC)]),
            (deny_action, "shmat", [(2, SCMP_CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC)]),
        ]
        sc.load(SCMP_ACT_ALLOW, mdwe_rules)
        report["MemoryDenyWriteExecute"] = {"seccomp": "on", "prctl PR_SET_MDWE": prctl_mdwe()}
    if r.allow is not None:
        n = sc.load(deny_action, [(SCMP_ACT_ALLOW, name, []) for name in sorted(r.allow)])
        report["allowed_syscalls"] = n
    elif r.deny:
        report["denied_syscalls"] = sc.load(
            SCMP_ACT_ALLOW, [(deny_action, name, []) for name in sorted(r.deny)]
        )
    examples = ("sched_setaffinity", "setrlimit", "setpriority", "chown", "setuid")
    report["denied_examples"] = sorted(n for n in examples if r.allow and n not in r.allow)
    return report


def main(argv: list[str]) -> int:
    report = "--report" in argv
    argv = [a for a in argv if a != "--report"]
    if len(argv) < 3 or argv[1] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    applied = apply(Path(argv[0]))
    if report:
        print("unit_sandbox " + json.dumps(applied), file=sys.stderr, flush=True)
    os.execvp(argv[2], argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
