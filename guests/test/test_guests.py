#!/usr/bin/env python3
"""Checks of the kvmrr guests that need no VM.

  test_guests.py --out DIR [--images-only] [--host-bin PATH]

Images: each DIR/<guest>.elf is a static ELF64 x86-64 executable whose PT_LOAD segments
lie at or above KVMRR_LOAD_MIN (paddr == vaddr) with the entry point in an executable
one, and whose code has no instruction a replay could not reproduce (RDTSC/RDTSCP/
RDRAND/RDSEED/CPUID) nor any SSE/AVX/MMX register use.

Host (with --host-bin, the binary built by `make test`): the runtime's snprintf against
libc's, boot-argument parsing, and kvstore's request handling against a Python model.
Prints "<n> passed, <m> failed" last; exits non-zero on any failure.
"""
import argparse
import random
import re
import struct
import subprocess
import sys

LOAD_MIN = 0x100000
GUESTS = ("hello", "ticks", "kvstore")
# Instructions a replay cannot reproduce or this host's KVM emulator cannot execute (INT3,
# INT n: "emulation failed"), and any x87/MMX/SSE/AVX register use.
FORBIDDEN = re.compile(r"^\s*(rdtscp?|rdrand|rdseed|cpuid|endbr64|rdpid|xgetbv|rdpmc|int3?|into"
                       r"|f[a-z]+|fx?save\w*|fx?rstor\w*|xsave\w*|xrstor\w*)\b"
                       r"|%[xyz]mm\d|%mm\d|%st\b")

results = {"passed": 0, "failed": 0}


def check(cond, what):
    if cond:
        results["passed"] += 1
    else:
        results["failed"] += 1
        print(f"FAIL {what}")
    return cond


# ---------------------------------------------------------------- images

def check_image(path):
    data = open(path, "rb").read()
    ok = check(data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1,
               f"{path}: ELF64 little-endian")
    if not ok:
        return
    (e_type, e_machine, _v, e_entry, e_phoff, _sh, _fl, _eh, e_phentsize,
     e_phnum) = struct.unpack_from("<HHIQQQIHHH", data, 16)
    check(e_type == 2, f"{path}: ET_EXEC")
    check(e_machine == 62, f"{path}: EM_X86_64")
    entry_ok = False
    loads = 0
    for i in range(e_phnum):
        p_type, p_flags, p_off, p_vaddr, p_paddr, p_filesz, p_memsz, _al = \
            struct.unpack_from("<IIQQQQQQ", data, e_phoff + i * e_phentsize)
        if p_type != 1:
            continue
        loads += 1
        check(p_paddr >= LOAD_MIN and p_paddr == p_vaddr,
              f"{path}: segment {i} at {p_paddr:#x} (vaddr {p_vaddr:#x})")
        check(p_filesz <= p_memsz and p_off + p_filesz <= len(data),
              f"{path}: segment {i} sizes")
        if p_flags & 1 and p_vaddr <= e_entry < p_vaddr + p_memsz:
            entry_ok = True
    check(loads > 0, f"{path}: has PT_LOAD segments")
    check(entry_ok and e_entry >= LOAD_MIN,
          f"{path}: entry {e_entry:#x} in an executable segment >= {LOAD_MIN:#x}")
    dis = subprocess.run(["objdump", "-d", "--no-show-raw-insn", path],
                         capture_output=True, text=True, check=True).stdout
    bad = [line.strip() for line in dis.splitlines()
           if "\t" in line and FORBIDDEN.search(line.split("\t", 1)[1].strip())]
    check(not bad, f"{path}: forbidden instructions: {bad[:5]}")


# ---------------------------------------------------------------- host runtime

def check_host_lib(host_bin):
    out = subprocess.run([host_bin, "fmt"], capture_output=True, text=True)
    check(out.returncode == 0 and " 0 failed" in out.stdout,
          f"runtime snprintf vs libc:\n{out.stdout}{out.stderr}")
    args = "timer_hz=250  report=0x10 flag ticks=12x dup=1 dup=2 empty= big=18446744073709551616"
    out = subprocess.run([host_bin, "bootargs", args, "timer_hz", "report", "flag", "ticks",
                          "dup", "empty", "missing", "big"], capture_output=True, text=True)
    want = ['mem_size=16777216', 'timer_hz: "250" u64=250', 'report: "0x10" u64=16',
            'flag: "" u64=777', 'ticks: "12x" u64=777', 'dup: "2" u64=2',
            'empty: "" u64=777', 'missing: NULL u64=777',
            'big: "18446744073709551616" u64=777']
    check(out.stdout.splitlines() == want, f"bootargs: {out.stdout!r}")


# ---------------------------------------------------------------- kvstore

FNV_OFFSET, FNV_PRIME, M64 = 0xcbf29ce484222325, 0x100000001b3, (1 << 64) - 1


def fnv1a(data, h=FNV_OFFSET):
    for b in data:
        h = ((h ^ b) * FNV_PRIME) & M64
    return h


def store_hash(store):
    return sum(fnv1a(k + b"\0" + v) for k, v in store.items()) & M64


class HashedStore(dict):
    """A dict that keeps store_hash() of itself up to date as it changes."""

    def __init__(self):
        super().__init__()
        self.hash = 0

    def __setitem__(self, k, v):
        self.pop(k, None)
        super().__setitem__(k, v)
        self.hash = (self.hash + fnv1a(k + b"\0" + v)) & M64

    def pop(self, k, default=None):
        if k not in self:
            return default
        v = super().pop(k)
        self.hash = (self.hash - fnv1a(k + b"\0" + v)) & M64
        return v


def frame(pkt):
    return struct.pack("<I", len(pkt)) + pkt


def run_kvstore(host_bin, packets, bootargs=""):
    proc = subprocess.run([host_bin, "kvstore", bootargs], input=b"".join(map(frame, packets)),
                          capture_output=True, timeout=120)
    replies, buf = [], proc.stdout
    while buf:
        (n,) = struct.unpack_from("<I", buf)
        replies.append(buf[4:4 + n])
        buf = buf[4 + n:]
    return proc.returncode, replies, proc.stderr.decode(errors="replace")


class Model:
    """What kvstore should answer; checks t= increases and GET returns PUT's v=."""

    def __init__(self):
        self.store, self.version, self.last_t = HashedStore(), {}, 0

    def expect(self, req, reply, label):
        body = req[:-1] if req.endswith(b"\n") else req
        body = body[:-1] if body.endswith(b"\r") else body
        rid, _, rest = body.lstrip(b" ").partition(b" ")
        fields = body.split()
        cmd = fields[1] if len(fields) > 1 else b""
        if cmd == b"PUT":
            key = fields[2]
            after_key = body.index(key, body.index(b"PUT") + 3) + len(key)
            value = body[after_key + 1:]
            full = len(self.store) >= 3072 and key not in self.store
            if full:
                return check(reply == rid + b" ERR full", f"{label}: {req!r} -> {reply!r}")
            m = re.fullmatch(rb"(\S+) OK t=(\d+) v=([0-9a-f]{8})", reply)
            if not check(m and m.group(1) == rid and int(m.group(2)) > self.last_t,
                         f"{label}: {req!r} -> {reply!r}"):
                return False
            self.last_t = int(m.group(2))
            self.store[key], self.version[key] = value, m.group(3)
            return True
        if cmd == b"GET":
            key = fields[2]
            if key not in self.store:
                return check(reply == rid + b" NOTFOUND", f"{label}: {req!r} -> {reply!r}")
            want = rid + b" OK v=" + self.version[key] + b" " + self.store[key]
            return check(reply == want, f"{label}: {req!r} -> {reply!r}, want {want!r}")
        if cmd == b"DEL":
            key = fields[2]
            want = rid + (b" OK" if self.store.pop(key, None) is not None else b" NOTFOUND")
            return check(reply == want, f"{label}: {req!r} -> {reply!r}, want {want!r}")
        if cmd == b"STAT":
            want = rid + b" OK n=%d h=%016x" % (len(self.store), self.store.hash)
            return check(reply == want, f"{label}: {req!r} -> {reply!r}, want {want!r}")
        raise ValueError(req)


def check_kvstore_script(host_bin):
    k64, v512 = b"k" * 64, bytes(range(32, 127)) * 5 + b"x" * 37
    assert len(v512) == 512
    cases = [
        (b"1 GET nothing", b"1 NOTFOUND"),
        (b"2 PUT a hello world", None),                 # value with spaces
        (b"3 GET a", b"3 OK v=* hello world"),
        (b"4 PUT a  two  spaces \n", None),             # value keeps its spaces, loses \n
        (b"5 GET a\r\n", b"5 OK v=*  two  spaces "),
        (b"6 PUT e ", None),                            # empty value
        (b"7 GET e", b"7 OK v=* "),
        (b"8 STAT", None),
        (b"9 DEL e", b"9 OK"),
        (b"10 DEL e", b"10 NOTFOUND"),
        (b"11 PUT " + k64 + b" " + v512, None),
        (b"12 GET " + k64, b"12 OK v=* " + v512),
        (b"13 PUT " + k64 + b"k v", b"13 ERR key-too-long"),
        (b"14 PUT k " + v512 + b"y", b"14 ERR value-too-long"),
        (b"15 PUT k", b"15 ERR missing-value"),
        (b"16 GET", b"16 ERR missing-key"),
        (b"17 GET a b", b"17 ERR extra-args"),
        (b"18 STAT x", b"18 ERR extra-args"),
        (b"19 FOO a", b"19 ERR unknown-command"),
        (b"20", b"20 ERR missing-command"),
        (b"", b"- ERR empty"),
        (b"   \n", b"- ERR empty"),
        (b"x" * 33 + b" STAT", b"- ERR bad-id"),
        (b"\x01 STAT", b"- ERR bad-id"),
        (b"21 GET a\tb", b"21 ERR bad-key"),
        (b"22 get a", b"22 ERR unknown-command"),
        (b"23 PUT bin \x00\xff\x01", None),             # binary value
        (b"24 GET bin", b"24 OK v=* \x00\xff\x01"),
        (b"25 PING", rb"25 OK ticks=\d+ rx=29"),         # the 29th packet
        (b"26 STAT", None),
        (b"27 PUT big " + b"z" * 3000, b"27 ERR value-too-long"),  # truncated to the MTU
        (b" 28  GET  a ", b"28 OK v=*  two  spaces "),  # lenient spacing around tokens
        (b"29 STAT", None),
        (b"q QUIT", b"q OK"),
    ]
    rc, replies, err = run_kvstore(host_bin, [c[0] for c in cases] + [b"after QUIT"])
    check(rc == 0, f"kvstore exit code {rc} after QUIT\n{err}")
    check("kvstore ready\n" in err and "kvstore bye requests=34 " in err,
          f"kvstore console: {err!r}")
    check(len(replies) == len(cases), f"kvstore: {len(replies)} replies for {len(cases)}")
    model = Model()
    versions = {}
    for (req, want), reply in zip(cases, replies):
        fields = req.split()
        cmd = fields[1] if len(fields) > 1 else b""
        if want is None:
            model.expect(req, reply, "script")
            if cmd == b"PUT":
                versions[fields[2]] = reply.rsplit(b"v=", 1)[-1]
            continue
        if cmd in (b"PUT", b"GET", b"DEL", b"STAT") and not b"ERR" in want:
            model.expect(req, reply, "script")
        if b"v=*" in want:
            want = want.replace(b"v=*", b"v=" + versions.get(fields[2], b"?"))
        if want.startswith(b"25 "):
            check(re.fullmatch(want, reply), f"script: {req!r} -> {reply!r}")
        else:
            check(reply == want, f"script: {req!r} -> {reply!r}, want {want!r}")


def check_kvstore_random(host_bin, seed=1, n=30000):
    """Random PUT/GET/DEL/STAT over more keys than the store holds (hits ERR full and
    exercises backward-shift deletion under heavy clustering)."""
    rng = random.Random(seed)
    keys = [b"key%d" % i for i in range(4500)] + [b"K" * rng.randint(1, 61) + b"%d" % i
                                                  for i in range(200)]
    reqs = []
    for i in range(n):
        fill = i < n // 4  # PUTs only at first, to fill the store up
        r = rng.random() * (0.45 if fill else 1.0)
        key = rng.choice(keys[:1000] if rng.random() < 0.5 and not fill else keys)
        if r < 0.45:
            val = bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 5, 40, 512])))
            reqs.append(b"%d PUT %s %s" % (i, key, val))
        elif r < 0.75:
            reqs.append(b"%d GET %s" % (i, key))
        elif r < 0.97:
            reqs.append(b"%d DEL %s" % (i, key))
        else:
            reqs.append(b"%d STAT" % i)
    rc, replies, err = run_kvstore(host_bin, reqs + [b"end QUIT"])
    check(rc == 0 and len(replies) == len(reqs) + 1,
          f"random: rc={rc} replies={len(replies)}\n{err[-500:]}")
    model = Model()
    bad = 0
    full = 0
    for req, reply in zip(reqs, replies):
        if reply.endswith(b"ERR full"):
            full += 1
        if not model.expect(req, reply, "random"):
            bad += 1
            if bad > 5:
                break
    check(full > 0, "random: the store filled up at least once")
    check(model.store.hash == store_hash(model.store), "random: incremental model hash")
    fin = b"s STAT"
    rc, replies2, _ = run_kvstore(host_bin, reqs + [fin, b"e QUIT"])
    check(replies2[-2] == b"s OK n=%d h=%016x" % (len(model.store), store_hash(model.store)),
          f"random: final STAT {replies2[-2]!r}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--host-bin")
    ap.add_argument("--images-only", action="store_true")
    a = ap.parse_args()
    for g in GUESTS:
        check_image(f"{a.out}/{g}.elf")
    if not a.images_only and a.host_bin:
        check_host_lib(a.host_bin)
        check_kvstore_script(a.host_bin)
        check_kvstore_random(a.host_bin)
    print(f"{results['passed']} passed, {results['failed']} failed")
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
