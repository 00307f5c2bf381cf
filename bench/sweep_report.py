"""bench/results.json -> bench/report.md and its PNG plots (matplotlib, no display).

Every point is the mean of its repeats, drawn with its spread (min to max); every figure
is stated beside its plain-run baseline as a ratio.  The defaults at the end are chosen
from the measured points by the rules stated there.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from statistics import mean

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

VMWARE_FT_IDLE = (0.5, 1.5)      # Mbit/s, VMware FT's published figures
VMWARE_FT_LOAD = (1.5, 18.0)


def spread(rows: list[dict], keys: tuple[str, ...], field: str) -> dict[tuple, tuple]:
    """(mean, min, max, n) of field per value of keys, over the rows that have it."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        if r.get(field) is not None:
            groups[tuple(r[k] for k in keys)].append(float(r[field]))
    return {k: (mean(v), min(v), max(v), len(v)) for k, v in groups.items()}


def _errorbar(ax, xs, stats, label, **kw):
    m = [stats[x][0] for x in xs]
    lo = [stats[x][0] - stats[x][1] for x in xs]
    hi = [stats[x][2] - stats[x][0] for x in xs]
    ax.errorbar(xs, m, yerr=[lo, hi], marker="o", capsize=4, label=label, **kw)


def _fmt(stat, digits=2) -> str:
    if stat is None:
        return "n/a"
    m, lo, hi, n = stat
    return f"{m:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f}, n={n})"


def _plot_counter_timer(rows, out: Path) -> list[str]:
    counters = sorted({r["counter"] for r in rows})
    hzs = sorted({r["timer_hz"] for r in rows})
    ratio = spread(rows, ("counter", "timer_hz"), "replay_over_record")
    rec = spread(rows, ("counter", "timer_hz"), "record_over_plain")
    nbytes = spread(rows, ("counter", "timer_hz"), "log_bytes_per_s")
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for c in counters:
        xs = [h for h in hzs if (c, h) in ratio]
        _errorbar(axes[0], xs, {h: ratio[(c, h)] for h in xs}, c)
        _errorbar(axes[1], xs, {h: rec[(c, h)] for h in xs}, c)
        _errorbar(axes[2], xs, {h: tuple(v / 1000 if i < 3 else v for i, v in
                                         enumerate(nbytes[(c, h)])) for h in xs}, c)
    for ax, title in zip(axes, ("replay / record (instructions/s)", "record / plain run",
                                "log kB/s while recording")):
        ax.set_xscale("log")
        ax.set_xlabel("guest timer (Hz)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "counter_timer.png", dpi=90)
    plt.close(fig)
    lines = ["| counter | timer Hz | record / plain | replay / record | log bytes/s |",
             "| --- | --- | --- | --- | --- |"]
    for c in counters:
        for h in hzs:
            if (c, h) in ratio:
                lines.append(f"| {c} | {h} | {_fmt(rec[(c, h)])} | {_fmt(ratio[(c, h)])} | "
                             f"{_fmt(nbytes[(c, h)], 0)} |")
    return lines


def _plot_txn(rows, out: Path) -> list[str]:
    xs = sorted({r["txn_ms"] for r in rows})
    p50 = spread(rows, ("txn_ms",), "output_commit_p50_ms")
    p99 = spread(rows, ("txn_ms",), "output_commit_p99_ms")
    c50 = spread(rows, ("txn_ms",), "client_latency_p50_ms")
    c99 = spread(rows, ("txn_ms",), "client_latency_p99_ms")
    thr = spread(rows, ("txn_ms",), "over_plain")
    logb = spread(rows, ("txn_ms",), "log_bytes_per_s")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for stats, label in ((p50, "output commit p50"), (p99, "output commit p99"),
                         (c50, "client request p50"), (c99, "client request p99")):
        keyed = [x for x in xs if (x,) in stats]
        _errorbar(axes[0], keyed, {x: stats[(x,)] for x in keyed}, label)
    axes[0].set_ylabel("latency (ms)")
    axes[0].set_yscale("log")
    keyed = [x for x in xs if (x,) in thr]
    _errorbar(axes[1], keyed, {x: thr[(x,)] for x in keyed}, "requests/s over plain")
    axes[1].axhline(0.7, color="red", ls="--", lw=1, label="issue floor 0.7")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("transaction interval (ms)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "txn_interval.png", dpi=90)
    plt.close(fig)
    lines = ["| interval ms | output commit p50 ms | p99 ms | client request p50 ms | p99 ms | "
             "requests/s over plain | log bytes/s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for x in xs:
        lines.append(f"| {x} | {_fmt(p50.get((x,)), 1)} | {_fmt(p99.get((x,)), 1)} | "
                     f"{_fmt(c50.get((x,)), 1)} | {_fmt(c99.get((x,)), 1)} | "
                     f"{_fmt(thr.get((x,)))} | {_fmt(logb.get((x,)), 0)} |")
    return lines


def _plot_policy(rows, out: Path) -> list[str]:
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    counts = sorted({r["backups"] for r in rows})
    thr = spread(rows, ("policy", "backups"), "over_plain")
    p99 = spread(rows, ("policy", "backups"), "output_commit_p99_ms")
    p50 = spread(rows, ("policy", "backups"), "output_commit_p50_ms")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(len(policies), 1)
    for i, p in enumerate(policies):
        for ax, stats in ((axes[0], thr), (axes[1], p99)):
            xs = [n for n in counts if (p, n) in stats]
            ax.bar([n + i * width for n in xs], [stats[(p, n)][0] for n in xs], width,
                   yerr=[[stats[(p, n)][0] - stats[(p, n)][1] for n in xs],
                         [stats[(p, n)][2] - stats[(p, n)][0] for n in xs]],
                   capsize=3, label=p)
    axes[0].set_ylabel("requests/s over plain")
    axes[1].set_ylabel("output commit p99 (ms)")
    for ax in axes:
        ax.set_xlabel("backups")
        ax.set_xticks([n + width * (len(policies) - 1) / 2 for n in counts], counts)
        ax.grid(alpha=0.3, axis="y")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "commit_policy.png", dpi=90)
    plt.close(fig)
    lines = ["| policy | backups | requests/s over plain | output commit p50 ms | p99 ms |",
             "| --- | --- | --- | --- | --- |"]
    for p in policies:
        for n in counts:
            if (p, n) in thr:
                lines.append(f"| {p} | {n} | {_fmt(thr[(p, n)])} | "
                             f"{_fmt(p50.get((p, n)), 1)} | {_fmt(p99.get((p, n)), 1)} |")
    return lines


def _plot_snapshots(rows, out: Path) -> list[str]:
    xs = sorted({r["snapshot_every"] for r in rows})
    cost = spread(rows, ("snapshot_every",), "record_over_no_periodic")
    catch = spread(rows, ("snapshot_every",), "catch_up_s")
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for x in xs:
        if (x,) in cost and (x,) in catch:
            c, k = cost[(x,)], catch[(x,)]
            ax.errorbar([k[0]], [c[0]], xerr=[[k[0] - k[1]], [k[2] - k[0]]],
                        yerr=[[c[0] - c[1]], [c[2] - c[0]]], marker="o", capsize=4,
                        label=f"every {x:,}" if x else "none periodic")
    ax.set_xlabel("late backup: latest snapshot -> end (s)")
    ax.set_ylabel("primary instructions/s over no periodic snapshots")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "snapshot_interval.png", dpi=90)
    plt.close(fig)
    lines = ["| snapshot every (instructions) | primary over no periodic | late backup catch-up s |",
             "| --- | --- | --- |"]
    for x in xs:
        lines.append(f"| {x or 'none periodic'} | {_fmt(cost.get((x,)))} | "
                     f"{_fmt(catch.get((x,)), 1)} |")
    return lines


def _plot_bandwidth(rows, out: Path) -> list[str]:
    names = list(dict.fromkeys(r["workload"] for r in rows))
    mbit = spread(rows, ("workload",), "mbit_per_s")
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.axhspan(*VMWARE_FT_IDLE, color="green", alpha=0.15, label="VMware FT idle 0.5–1.5")
    ax.axhspan(*VMWARE_FT_LOAD, color="orange", alpha=0.10, label="VMware FT load 1.5–18")
    ms = [mbit[(n,)] for n in names]
    ax.bar(names, [m[0] for m in ms], yerr=[[m[0] - m[1] for m in ms],
                                             [m[2] - m[0] for m in ms]], capsize=4)
    ax.set_yscale("log")
    ax.set_ylabel("log Mbit/s")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "bandwidth.png", dpi=90)
    plt.close(fig)
    lines = ["| workload | log Mbit/s |", "| --- | --- |"]
    lines += [f"| {n} | {_fmt(mbit[(n,)], 4)} |" for n in names]
    return lines


def choose_defaults(s: dict) -> list[str]:
    """The defaults the measurements support, each with its rule and its numbers."""
    out = []
    s = {k: s.get(k, []) for k in ("counter_timer", "txn_interval", "commit_policy",
                                   "snapshot_interval", "bandwidth")}
    # a backup must keep up with a primary that must keep up with the workload: judge a
    # counter by the slower of its record and its replay, each against the plain run
    worst: dict[str, list[float]] = defaultdict(list)
    for r in s["counter_timer"]:
        worst[r["counter"]].append(min(r["record_over_plain"],
                                       r["replay_ips"] / r["plain_ips"]))
    if worst:
        best = max(worst, key=lambda c: mean(worst[c]))
        others = ", ".join(f"`{c}` {mean(v):.2f}" for c, v in worst.items() if c != best)
        out.append(f"- **Counter: `{best}`**: the slower of its record and replay runs at "
                   f"{mean(worst[best]):.2f}x a plain run (mean over the timer frequencies"
                   f"{'; ' + others if others else ''}). `--mode auto` takes `fast` "
                   "whenever its calibration probe finds the statistic exact.")
    txn = s["txn_interval"]
    thr = spread(txn, ("txn_ms",), "over_plain")
    p99 = spread(txn, ("txn_ms",), "client_latency_p99_ms")     # what a client waits
    if thr and p99:
        top = max(v[0] for v in thr.values())
        ok = [k[0] for k, v in thr.items() if v[0] >= 0.95 * top and k in p99]
        if ok:
            pick = min(ok, key=lambda x: p99[(x,)][0])
            out.append(f"- **Transaction interval: {pick} ms** (`--txn-ms`): the lowest "
                       f"client request p99 ({p99[(pick,)][0]:.0f} ms) among the intervals "
                       f"within 5% of the best throughput ({top:.2f}x plain).")
    pol = spread(s["commit_policy"], ("policy", "backups"), "output_commit_p99_ms")
    logs = [v[0] for (p, _), v in pol.items() if p == "log"]
    others = [v[0] for (p, _), v in pol.items() if p != "log"]
    if logs and others:
        out.append(f"- **Commit policy: `log`**: output commit p99 {mean(logs):.0f} ms, "
                   f"against {mean(others):.0f} ms for `backups:N` (mean over backup counts); "
                   "`backups:N` is for when a response must survive the loss of Kafka too.")
    snap = s["snapshot_interval"]
    cost = spread(snap, ("snapshot_every",), "record_over_no_periodic")
    catch = spread(snap, ("snapshot_every",), "catch_up_s")
    cheap = [k[0] for k, v in cost.items() if k[0] and v[0] >= 0.95 and k in catch]
    if cheap:
        pick = min(cheap, key=lambda x: catch[(x,)][0])
        out.append(f"- **Snapshot interval: {pick:,} instructions** (`--snapshot-every`): the "
                   f"fastest late-backup catch-up ({catch[(pick,)][0]:.1f} s) among the "
                   "intervals that cost the primary at most 5% of its instructions/s.")
    elif cost:
        out.append("- **Snapshot interval:** every periodic interval measured cost the primary "
                   "more than 5%; keep the default (none periodic) and snapshot on demand.")
    return out


SECTIONS = [
    ("counter_timer", "Counting backend and timer frequency",
     "`ticks` guest, no Kafka (an in-memory log); the baseline is a plain run of the same "
     "number of instructions.", _plot_counter_timer, "counter_timer.png"),
    ("txn_interval", "Transaction interval",
     "kvstore served through the gateway, one backup, `--commit log`, a fixed offered load; "
     "the baseline is a plain run (no log) under the same load. Output commit latency runs "
     "from the start of the slice (one transaction interval) in which the guest produced "
     "the response to its release; the client's request latency is end to end.", _plot_txn,
     "txn_interval.png"),
    ("commit_policy", "Commit policy and number of backups",
     "kvstore served through the gateway under a fixed offered load, against a plain run.",
     _plot_policy, "commit_policy.png"),
    ("snapshot_interval", "Snapshot interval",
     "The cost on the primary (its instructions/s against a run with only the initial "
     "snapshot) against a late backup's catch-up (`replay --start latest` to the end of the "
     "log).", _plot_snapshots, "snapshot_interval.png"),
    ("bandwidth", "Log bandwidth per workload",
     "Bytes of the log topic over the recording's wall time (snapshots excluded), beside "
     "VMware FT's published 0.5–1.5 Mbit/s idle and 1.5–18 Mbit/s under load. The guests "
     "here run at emulator speed, so they produce fewer events per second than on hardware.",
     _plot_bandwidth, "bandwidth.png"),
]


def write_report(results: dict, out: Path) -> Path:
    s = results["sections"]
    m = results["machine"]
    parts = [
        "# kvmrr overhead analysis",
        "",
        f"Measured by `make bench{' QUICK=1' if results['quick'] else ''}` in "
        f"{results['seconds']} s on `{m['host']}` ({m['cpus']} CPUs, {m['platform']}; load "
        f"average {m['loadavg_at_start']} at start, {m['loadavg_at_end']} at end). "
        f"Counter `{m['counter']}`: {m['counter_why']}.",
        "",
        "**This machine emulates ring-0 guest code** (docs/ARCHITECTURE.md §8): KVM runs the "
        "guests in its instruction emulator at about 1 M instructions/s, with no hardware "
        "PMU. Absolute rates are therefore far below real hardware; every figure is stated "
        "next to a plain-run baseline measured in the same run, as a ratio. Each point is "
        "the mean of "
        f"{results['config']['repeats']} repeats, shown as mean (min–max, n). The machine "
        "is shared and noisy.",
        "",
        "The sweep's parameters come from `bench/sweep.json`; the raw rows are in "
        "`bench/results.json`.",
        "",
    ]
    for key, title, text, plot, png in SECTIONS:
        if key not in s:
            continue
        parts += [f"## {title}", "", text, "", f"![{title}]({png})", "",
                  *plot(s[key], out), ""]
    parts += ["## Defaults chosen", "", *choose_defaults(s), ""]
    path = out / "report.md"
    path.write_text("\n".join(parts))
    return path
