"""The table of scripts/bench.sh: medians per workload and image, with the two floors.

Usage: bench-table.py RESULTS CACHE_BYTES IMG=DESCRIPTION:CONTENT...

RESULTS has one line per run: workload, image, side, round, value, VmHWM in KiB (tab-separated).
The null side (the transport floor) has no image ("-") and serves as the floor of every image; the
raw side (the page-cache and disk floor) is recorded under the image whose guest bytes it holds
(CONTENT: A or B) and serves every image with those bytes. Ratios say how many times better
qcowfs is (throughput: qcowfs/other; latency, readlat: other/qcowfs), so a fraction of a floor is
at most about 1. The RSS bound is --cache-size + 32 MiB.
"""

import statistics
import sys
from collections import defaultdict

NAMES = {
    "seqread": "seq read 1M",
    "randread": "rand read 4k QD1",
    "randread4j": "rand read 4k 4 jobs",
    "seqwrite": "seq write 1M + fsync",
    "randwrite": "rand write 4k fsync/64",
    "mixed": "rand 70/30 read/write 4k QD1",
    "readlat": "p99 4k read during seq write",
}


def main(argv):
    rows = [l.rstrip("\n").split("\t") for l in open(argv[1]) if l.strip()]
    bound_kib = int(argv[2]) // 1024 + 32 * 1024
    desc, content = {}, {}
    for arg in argv[3:]:
        img, rest = arg.split("=", 1)
        desc[img], content[img] = rest.rsplit(":", 1)
    vals = defaultdict(list)
    rss = defaultdict(int)
    workloads, images = [], []
    for wl, img, side, _rnd, value, hwm in rows:
        if wl not in workloads:
            workloads.append(wl)
        if side in ("qcowfs", "qemu") and img not in images:
            images.append(img)
        vals[wl, img, side].append(float(value))
        rss[wl, img, side] = max(rss[wl, img, side], int(hwm))

    def median(wl, img, side):
        v = vals.get((wl, img, side))
        return statistics.median(v) if v else None

    def better(wl, mine, other):
        if mine is None or other is None or mine <= 0 or other <= 0:
            return "–"
        return "%.2f" % (other / mine if wl == "readlat" else mine / other)

    def fmt(v):
        return "–" if v is None else "%.1f" % v

    out = [
        "| workload | image | unit | qcowfs | QEMU | null FUSE | raw file | x QEMU | of null | "
        "of raw | qcowfs peak RSS | QEMU peak RSS |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    over = []
    for img in images:
        for wl in workloads:
            q, e = median(wl, img, "qcowfs"), median(wl, img, "qemu")
            n, r = median(wl, "-", "null"), median(wl, content.get(img, img), "raw")
            if q is None and e is None:
                continue
            unit = "MiB/s" if wl.startswith("seq") else "us p99" if wl == "readlat" else "IOPS"
            hq, he = rss[wl, img, "qcowfs"], rss[wl, img, "qemu"]
            if hq > bound_kib:
                over.append("%s on %s: %.1f MiB" % (NAMES.get(wl, wl), img, hq / 1024))
            out.append(
                "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %.1f MiB | %.1f MiB |"
                % (NAMES.get(wl, wl), desc.get(img, img), unit, fmt(q), fmt(e), fmt(n), fmt(r),
                   better(wl, q, e), better(wl, q, n), better(wl, q, r), hq / 1024, he / 1024))
    out.append("")
    out.append("qcowfs's RSS bound (--cache-size + 32 MiB): %.0f MiB; %s." % (
        bound_kib / 1024, "exceeded by " + "; ".join(over) if over else "every run within it"))
    out.append("")
    out.append("Per round (in round order):")
    out.append("")
    for (wl, img, side), v in vals.items():
        out.append("- %s, %s, %s: %s" % (NAMES.get(wl, wl), "no image" if img == "-" else img,
                                         side, ", ".join("%.1f" % x for x in v)))
    print("\n".join(out))


if __name__ == "__main__":
    main(sys.argv)
