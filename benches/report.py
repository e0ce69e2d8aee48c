#!/usr/bin/env python3
"""Turns compare.sh's results.tsv (KEY<TAB>VALUE lines) into the Markdown report.

Keys: size, cores, cpu, commit, date, kinds (JSON), TOOL.{full,incr,restore}.{s,rss,cpu,verified,error},
TOOL.repo, TOOL.full.repo, rbd.{export_diff,import}.s, ferry.rbd_{backup,restore}.s,
kernel.chunk_{encode,decode}.KIND and kernel.zero (ns per 4 MiB block).
"""

import json
import sys

MIB = 1 << 20
TOOLS = [("ferry", "ferry"), ("restic", "restic 0.14"), ("borg", "borg 1.2"), ("benji", "Benji 0.17")]


class Results(dict):
    """KEY -> last value; .all(KEY) -> every value (one per round)."""

    def __init__(self):
        super().__init__()
        self.values = {}

    def all(self, k):
        return self.values.get(k, [])


def load(path):
    r = Results()
    with open(path) as f:
        for line in f:
            k, _, v = line.rstrip("\n").partition("\t")
            r[k] = v
            r.values.setdefault(k, []).append(v)
    return r


def num(r, k):
    """A measurement over the rounds: best (lowest) time and CPU, worst (highest) RSS."""
    vals = []
    for v in r.all(k):
        try:
            vals.append(float(v))
        except ValueError:
            pass
    if not vals:
        return None
    if k.endswith(".rss") or k.endswith(".own_rss") or k.endswith(".busy"):
        return max(vals)
    # Kernels run before and after the rounds: the fastest is the machine's ceiling (strict).
    if k.endswith(".s") or k.endswith(".cpu") or k.endswith("osd_cpu") or k.startswith("kernel."):
        return min(vals)
    return vals[-1]


def fmt_s(x):
    return "–" if x is None else (f"{x:.2f} s" if x < 10 else f"{x:.1f} s")


def fmt_mib(x):
    return "–" if x is None else f"{x:.0f} MiB"


def fmt_ratio(x):
    return "–" if x is None else f"{x:.2f}×"


def main():
    r = load(sys.argv[1])
    size = num(r, "size") or 0
    cores = int(num(r, "cores") or 1)
    out = []
    p = out.append
    p(f"Run {r.get('date', '?')} on {cores} cores ({r.get('cpu', '?')}), ferry {r.get('commit', '?')}; "
      f"image {size / (1 << 30):.2f} GiB")
    busy = [num(r, k) for k in r.values if k.endswith(".busy")]
    busy = [b for b in busy if b is not None]
    rounds = int(num(r, "rounds") or 1)
    p(f"{rounds} round(s), best wall time of each; CPUs busy with other processes just before the runs: "
      + (f"{min(busy):.0f}–{max(busy):.0f}%" if busy else "?")
      + (f"; uncommitted changes outside benches/: {r['dirty'].strip()}" if r.get("dirty", "").strip() else ""))
    if r.get("cache_dropped") == "0":
        p("(page cache could NOT be dropped between runs)")
    p("")

    # ---------------------------------------------------------------- per tool
    p("| tool | full backup | incremental (10 × 64 KiB) | restore | repository | peak RSS full / incr / restore | CPU s full / incr / restore |")
    p("|---|---|---|---|---|---|---|")
    for t, name in TOOLS:
        if f"{t}.full.s" not in r and f"{t}.full.error" not in r and f"{t}.error" not in r:
            continue
        cells = []
        for op in ("full", "incr", "restore"):
            s = num(r, f"{t}.{op}.s")
            if s is None:
                err = r.get(f"{t}.{op}.error") or r.get(f"{t}.error")
                cells.append(f"failed: {err}" if err else "–")
                continue
            c = fmt_s(s)
            if op != "incr":
                c += f", {size / MIB / s:.0f} MiB/s"
            if op == "restore" and r.get(f"{t}.restore.verified") == "0":
                c += " **(content differs!)**"
            cells.append(c)
        repo = num(r, f"{t}.repo")
        rss = [num(r, f"{t}.{op}.rss") for op in ("full", "incr", "restore")]
        cpu = [num(r, f"{t}.{op}.cpu") for op in ("full", "incr", "restore")]
        rss_c = " / ".join("–" if x is None else f"{x / 1024:.0f}" for x in rss) + " MiB"
        cpu_c = " / ".join("–" if x is None else f"{x:.1f}" for x in cpu)
        repo_c = "–" if repo is None else f"{repo / MIB:.1f} MiB"
        p(f"| {name} | {cells[0]} | {cells[1]} | {cells[2]} | {repo_c} | {rss_c} | {cpu_c} |")
    p("")
    p("Throughput = image size / wall time. ferry reads the full export-diff stream (zero objects are "
      "not in it, as with `rbd export-diff`); restic and borg read the raw image from stdin; Benji reads "
      "the raw image file (full: all of it; incremental: only the blocks named by the hints file). "
      "Repository = `du -sb` after both backups (Benji: its storage directory, without its sqlite database).")
    p("")

    # ---------------------------------------------------------------- ratios
    fs, fi, fr, frepo = (num(r, "ferry.full.s"), num(r, "ferry.incr.s"), num(r, "ferry.restore.s"), num(r, "ferry.repo"))
    ratios = {}
    rows = []
    for t, name in TOOLS[1:]:
        def ratio(op, mine):
            peer = num(r, f"{t}.{op}.s")
            return None if peer is None or not mine else peer / mine
        full, incr, rest = ratio("full", fs), ratio("incr", fi), ratio("restore", fr)
        repo = num(r, f"{t}.repo")
        rr = None if repo is None or frepo is None else frepo / repo
        ratios[t] = (full, incr, rest, rr)
        if any(x is not None for x in (full, incr, rest, rr)):
            rows.append(f"| {name} | {fmt_ratio(full)} | {fmt_ratio(incr)} | {fmt_ratio(rest)} | {'–' if rr is None else f'{rr:.3f}'} |")
    if rows:
        p("| ferry vs | full backup speed (peer time / ferry time) | incremental speed | restore speed | repository size (ferry / peer) |")
        p("|---|---|---|---|---|")
        out.extend(rows)
        p("")

    # ---------------------------------------------------------------- rbd
    ed, imp = num(r, "rbd.export_diff.s"), num(r, "rbd.import.s")
    rb, rres = num(r, "ferry.rbd_backup.s"), num(r, "ferry.rbd_restore.s")
    if ed is not None or imp is not None or "ceph.error" in r:
        p("| RBD (dev cluster on the same 2 cores, 1 OSD on a sparse file) | time | CPU s (process / OSD) | vs limit |")
        p("|---|---|---|---|")

        def cpu(k):
            a, b = num(r, f"{k}.cpu"), num(r, f"{k}.osd_cpu")
            return f"{'–' if a is None else f'{a:.1f}'} / {'–' if b is None else f'{b:.1f}'}"
        if "ceph.error" in r:
            p(f"| cluster | failed: {r['ceph.error']} | | |")
        p(f"| `rbd export-diff --whole-object` to /dev/null (source limit) | {fmt_s(ed)} | {cpu('rbd.export_diff')} | |")
        p(f"| `rbd import` of the raw image (target limit) | {fmt_s(imp)} | {cpu('rbd.import')} | |")
        if "ferry.rbd.skipped" in r:
            p(f"| ferry rbd: backup / restore | skipped: {r['ferry.rbd.skipped']} | | |")
        else:
            p(f"| `ferry backup rbd:POOL/IMAGE` (full) | {fmt_s(rb)}{', ' + r['ferry.rbd_backup.error'] if 'ferry.rbd_backup.error' in r else ''} | {cpu('ferry.rbd_backup')} | "
              f"{fmt_ratio(rb / ed) if rb and ed else '–'} export-diff |")
            v = "" if r.get("ferry.rbd_restore.verified") != "0" else " **(content differs!)**"
            p(f"| `ferry restore --to rbd:POOL/NEW` | {fmt_s(rres)}{v}{', ' + r['ferry.rbd_restore.error'] if 'ferry.rbd_restore.error' in r else ''} | {cpu('ferry.rbd_restore')} | "
              f"{fmt_ratio(rres / imp) if rres and imp else '–'} import |")
        p("")

    # ---------------------------------------------------------------- ceiling
    ceiling_bps = ceiling_restore_bps = None
    kinds = json.loads(r["kinds"]) if "kinds" in r else None
    kern = {k: num(r, f"kernel.chunk_encode.{k}") for k in ("binary", "text", "random")}
    dkern = {k: num(r, f"kernel.chunk_decode.{k}") for k in ("binary", "text", "random")}
    kz = num(r, "kernel.zero")
    if kinds and all(kern.values()) and kz:
        ns = kinds["zero"] * kz + sum(kinds[k] * kern[k] for k in kern)
        core_s = ns / 1e9
        ceiling_s = core_s / cores
        ceiling_bps = size / ceiling_s
        p(f"Machine ceiling (criterion kernels, 1 core, per 4 MiB block: zero check {kz / 1e6:.2f} ms; "
          + ", ".join(f"encode {k} {kern[k] / 1e6:.1f} ms ({4 * 1e9 / kern[k]:.0f} MiB/s)" for k in kern)
          + f"). Block mix of the image: {kinds['zero']} zero, {kinds['binary']} binary, {kinds['text']} text, "
          f"{kinds['random']} random.")
        runs = len(r.all("kernel.chunk_encode.binary"))
        if runs > 1 and all(v.strip() for v in r.all("kernel.chunk_encode.binary")):
            spread = [float(v) for v in r.all("kernel.chunk_encode.binary") if v.strip()]
            p("")
            p(f"The kernels ran {runs} times (before and after the rounds: this machine's speed drifts); the ceiling "
              f"takes the fastest of each (encode binary measured {min(spread) / 1e6:.1f}–{max(spread) / 1e6:.1f} ms), "
              "so a slow phase during ferry's runs counts against ferry.")
        p("")
        p("| pipeline | core-seconds | ceiling on "
          f"{cores} cores | ferry | ferry / ceiling |")
        p("|---|---|---|---|---|")
        fcpu = num(r, "ferry.full.cpu")
        p(f"| backup: zero check + hash + zstd 3 + AES-GCM | {core_s:.2f} | {fmt_s(ceiling_s)}, {ceiling_bps / MIB:.0f} MiB/s | "
          f"{fmt_s(fs)}, {size / MIB / fs:.0f} MiB/s, {fcpu if fcpu is not None else '–'} CPU s | "
          f"{(size / fs) / ceiling_bps * 100:.0f}% |" if fs else "| backup | | | – | – |")
        rd_cpu, rd_s = num(r, "read.full_diff.cpu"), num(r, "read.full_diff.s")
        if rd_cpu is not None and fs:
            core2 = core_s + rd_cpu
            ceiling2_s = max(core2 / cores, rd_s or 0)
            p(f"| backup, plus reading the diff from this disk after a cache drop ({rd_cpu:.2f} CPU s, {fmt_s(rd_s)} alone) | "
              f"{core2:.2f} | {fmt_s(ceiling2_s)}, {size / ceiling2_s / MIB:.0f} MiB/s | {fmt_s(fs)} | {ceiling2_s / fs * 100:.0f}% |")
        if all(dkern.values()):
            dns = sum(kinds[k] * dkern[k] for k in dkern)
            dcore = dns / 1e9
            ceiling_restore_bps = size / (dcore / cores)
            rcpu = num(r, "ferry.restore.cpu")
            p(f"| restore: AES-GCM open + unzstd + hash check | {dcore:.2f} | {fmt_s(dcore / cores)}, {ceiling_restore_bps / MIB:.0f} MiB/s | "
              f"{fmt_s(fr)}, {size / MIB / fr:.0f} MiB/s, {rcpu if rcpu is not None else '–'} CPU s | "
              f"{(size / fr) / ceiling_restore_bps * 100:.0f}% |" if fr else "| restore | | | – | – |")
            rp = num(r, "ferry.restore_pipe.s")
            if rp:
                p(f"| restore into a pipe to /dev/null (no disk) | {dcore:.2f} | {fmt_s(dcore / cores)} | "
                  f"{fmt_s(rp)}, {size / MIB / rp:.0f} MiB/s, {num(r, 'ferry.restore_pipe.cpu')} CPU s | "
                  f"{(size / rp) / ceiling_restore_bps * 100:.0f}% |")
            wf = num(r, "write.floor.s")
            if wf and fr:
                p(f"| writing the image to this disk (`dd conv=sparse,fsync`, the floor of a restore to a file) | "
                  f"{num(r, 'write.floor.cpu')} | {fmt_s(wf)} | {fmt_s(fr)} | {wf / fr * 100:.0f}% |")
        p("")
        p("The first ceiling counts only the CPU work per block (no diff parsing, file reads, object writes, "
          "fsync or process start), so it is an upper bound on this machine; the goal is judged against it. "
          "Reading a file from this VM's disk after the cache drop costs guest CPU (system time), which the "
          "second line adds.")
        p("")

    # ---------------------------------------------------------------- rgw
    if any(k.startswith(("ferry.s3_", "s3peer.")) for k in r.values):
        p("| RGW (dev cluster on the same 2 cores) | time | throughput | requests | CPU s (process / radosgw / OSD) |")
        p("|---|---|---|---|---|")
        for run, what, bk in [("ferry.s3_full", "`ferry backup` to s3:// (full)", "bytes_up"),
                              ("ferry.s3_restore", "`ferry restore` from s3:// to a file", "bytes_down"),
                              ("ferry.s3_restore_pipe", "`ferry restore` from s3:// into a pipe", "bytes_down")]:
            t, b = num(r, f"{run}.s"), num(r, f"{run}.{bk}")
            err = r.get(f"{run}.error")
            if t is None:
                p(f"| {what} | {'failed: ' + err if err else '–'} | | | |")
                continue
            tp = f"{b / MIB / t:.0f} MiB/s {'up' if bk == 'bytes_up' else 'down'}" if b else "–"
            p(f"| {what} | {fmt_s(t)} | {tp} | {r.get(f'{run}.requests', '–')} | {num(r, f'{run}.cpu')} / "
              f"{num(r, f'{run}.rgw_cpu')} / {num(r, f'{run}.osd_cpu')} |")
        pb, ps, gs = num(r, "s3peer.bytes"), num(r, "s3peer.put_s"), num(r, "s3peer.get_s")
        if pb and ps and gs:
            objs = r.get("s3peer.objects", "?")
            p(f"| boto3 PUT of the same {objs} objects, 16 in flight | {fmt_s(ps)} | {pb / MIB / ps:.0f} MiB/s up | {objs} PUT | "
              f"PUT and GET together: – / {num(r, 's3peer.rgw_cpu')} / {num(r, 's3peer.osd_cpu')} |")
            p(f"| boto3 GET of them, 16 in flight | {fmt_s(gs)} | {pb / MIB / gs:.0f} MiB/s down | {objs} GET | |")
        elif "s3peer.error" in r:
            p(f"| boto3 | failed: {r['s3peer.error']} | | | |")
        p("")

    # ---------------------------------------------------------------- requests
    req_runs = [k[: -len(".requests")] for k in r.values if k.endswith(".requests")]
    if req_runs:
        p("| ferry run | requests to the store | bytes up / down | ferry's own peak RSS |")
        p("|---|---|---|---|")
        for run in req_runs:
            up, down, own = num(r, f"{run}.bytes_up"), num(r, f"{run}.bytes_down"), num(r, f"{run}.own_rss")
            p(f"| {run} | {r[run + '.requests']} | {'–' if up is None else f'{up / MIB:.1f} MiB'} / "
              f"{'–' if down is None else f'{down / MIB:.1f} MiB'} | {'–' if own is None else f'{own / 1024:.0f} MiB'} |")
        p("")

    # ---------------------------------------------------------------- goals
    p("| goal | measured | met? |")
    p("|---|---|---|")

    def goal(text, value, ok, shown):
        mark = "n/a" if value is None else ("**yes**" if ok(value) else "**NO**")
        p(f"| {text} | {shown(value) if value is not None else 'not measured'} | {mark} |")

    for t, name in TOOLS[1:]:
        goal(f"full backup ≥ 3× {name}", ratios.get(t, (None,) * 4)[0], lambda x: x >= 3, fmt_ratio)
    goal("incremental ≥ 10× restic", ratios.get("restic", (None,) * 4)[1], lambda x: x >= 10, fmt_ratio)
    goal("incremental ≥ 2× Benji with hints", ratios.get("benji", (None,) * 4)[1], lambda x: x >= 2, fmt_ratio)
    goal("restore ≥ 2× Benji", ratios.get("benji", (None,) * 4)[2], lambda x: x >= 2, fmt_ratio)
    goal("restore ≥ 3× restic", ratios.get("restic", (None,) * 4)[2], lambda x: x >= 3, fmt_ratio)
    goal("repository ≤ 1.02 × borg's", ratios.get("borg", (None,) * 4)[3], lambda x: x <= 1.02, lambda x: f"{x:.3f}")
    rss = [num(r, f"ferry.{op}.rss") for op in ("full", "incr", "restore")]
    rss = [x for x in rss if x is not None]
    goal("ferry peak RSS ≤ 128 MiB", max(rss) / 1024 if rss else None, lambda x: x <= 128, lambda x: f"{x:.0f} MiB")
    goal("RBD full backup ≤ 1.15 × bare export-diff", rb / ed if rb and ed else None, lambda x: x <= 1.15, fmt_ratio)
    goal("RBD restore ≤ 1.25 × rbd import", rres / imp if rres and imp else None, lambda x: x <= 1.25, fmt_ratio)
    goal("backup pipeline ≥ 80% of the ceiling", (size / fs) / ceiling_bps if fs and ceiling_bps else None,
         lambda x: x >= 0.8, lambda x: f"{x * 100:.0f}%")
    print("\n".join(out))


if __name__ == "__main__":
    main()
