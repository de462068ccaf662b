#!/usr/bin/env python3
"""Writes q35-2g-smm-handmade.log: a HAND-MADE QEMU 7.2 trace with SMM (address space 1) slots.

No real one can be captured on the machine this project is developed on: its kernel reports
KVM_CAP_MULTI_ADDRESS_SPACE = 0 (nested KVM), so QEMU creates no SMM address space, and QEMU's
TCG emits no kvm_set_user_memory events. This script derives one from the real capture
q35-2g-std.log the way QEMU 7.2's second KVM memory listener (as_id 1, "kvm-smram") would
behave: after each commit of address space 0, the same changes in address space 1, whose ids the
listener allocates lowest-free on its own, printed as QEMU 7.2 prints them (Slot# = 1 << 16 | id,
no AddrSpace#); plus SMRAM (0xa0000, 128 KiB of RAM, which only SMM sees) once low RAM is cut
at 0xa0000. Run from this directory: python3 make-handmade.py
"""

import re

SRC = "../q35-2g-std.log"
DST = "q35-2g-smm-handmade.log"
LINE = re.compile(r"kvm_set_user_memory Slot#(\d+) flags=(0x[0-9a-f]+) gpa=(0x[0-9a-f]+) "
                  r"size=(0x[0-9a-f]+) ua=(0x[0-9a-f]+) ret=(-?\d+)")


def commits(calls):
    out, cur = [], []
    for c in calls:
        if c["size"] == 0 and cur and cur[-1]["size"] != 0:
            out.append(cur)
            cur = []
        cur.append(c)
    if cur:
        out.append(cur)
    return out


def fmt(slot, c):
    return (f"kvm_set_user_memory Slot#{slot} flags={c['flags']:#x} gpa={c['gpa']:#x} "
            f"size={c['size']:#x} ua={c['ua']:#x} ret={c['ret']}")


calls = []
for line in open(SRC):
    m = LINE.search(line)
    if m:
        slot, flags, gpa, size, ua, ret = m.groups()
        calls.append(dict(slot=int(slot), flags=int(flags, 16), gpa=int(gpa, 16),
                          size=int(size, 16), ua=int(ua, 16), ret=int(ret)))

out = [
    "# HAND-MADE, not captured: QEMU 7.2's format with SMM slots (Slot#65536 and up = address",
    "# space 1), derived from q35-2g-std.log by make-handmade.py; see README.md in this directory",
    "# for why no real SMM trace could be captured here.",
]
smm_ids = {}  # address-space-0 id -> address-space-1 id
smram = None
for commit in commits(calls):
    for c in commit:
        out.append(fmt(c["slot"], c))
    mirrored = []
    for c in commit:
        if c["ret"] != 0:
            continue
        if c["size"] == 0:
            mirrored.append((1 << 16 | smm_ids.pop(c["slot"]), c))
        elif c["slot"] in smm_ids:  # flags change or move of a live slot
            mirrored.append((1 << 16 | smm_ids[c["slot"]], c))
        else:
            used = set(smm_ids.values()) | ({smram} if smram is not None else set())
            new = min(i for i in range(32764) if i not in used)
            smm_ids[c["slot"]] = new
            mirrored.append((1 << 16 | new, c))
    for slot, c in mirrored:
        out.append(fmt(slot, c))
    low = [c for c in commit if c["gpa"] == 0 and c["size"] == 0xA0000 and c["ret"] == 0]
    if smram is None and low:
        used = set(smm_ids.values())
        smram = min(i for i in range(32764) if i not in used)
        c = dict(flags=0, gpa=0xA0000, size=0x20000, ua=low[0]["ua"] + 0xA0000, ret=0)
        out.append(fmt(1 << 16 | smram, c))

with open(DST, "w") as f:
    f.write("\n".join(out) + "\n")
