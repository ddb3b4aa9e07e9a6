#!/usr/bin/env python3
"""Merge the `qcowfs audit --json` output of many hosts into one fleet report.

Each input is one host's JSON Lines, named after the host: `NAME.jsonl` (what
`qcowfs audit --json > NAME.jsonl` writes), or a folder of them; a `NAME.stderr` beside it, when
present, holds what the audit printed on stderr and is shown with the host. The host is the file's name, not the
"host" field of the rows (that is the machine's own name; two inventory entries may share it).

Per host and in total: the disks, the disks that could not be audited (a row with "error"),
the encrypted disks (encryption other than "none"), the encrypted disks that lean on plaintext
bases (plaintext_base_bytes > 0, as `qcowfs audit`'s summary counts them), and the guest data of
those disks that their plaintext bases provide. Fields this script does not know are ignored.

Prints a table, writes fleet.json and fleet.txt with --out, and with a --max-* limit checks
every host against it: the exit status is 3 when a host is over a limit or an expected host
(--expect) has no file, 2 when an input cannot be read, else 0.
"""

import argparse
import glob
import json
import os
import sys

EXIT_OVER_LIMIT = 3
EXIT_BAD_INPUT = 2

# The measures a limit can apply to, each with the words a message uses for it.
LIMITS = {
    "leaning_disks": "encrypted disks leaning on plaintext bases",
    "plaintext_bytes": "bytes of their guest data in plaintext bases",
    "unaudited_disks": "disks that could not be audited",
}


class BadInput(Exception):
    """An input file that is not a host's JSON Lines."""


def human(n):
    """Bytes as `qcowfs audit` prints them: 512 B, 1.5 MiB."""
    value, units = float(n), ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
    unit = 0
    while value >= 1024 and unit < len(units) - 1:
        value /= 1024
        unit += 1
    return f"{n} B" if unit == 0 else f"{value:.1f} {units[unit]}"


def empty_counts():
    return {
        "disks": 0,
        "unaudited_disks": 0,
        "encrypted_disks": 0,
        "leaning_disks": 0,
        "plaintext_bytes": 0,
        "base_plaintext_bytes": 0,
    }


def read_rows(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise BadInput(f"{path}:{number}: not JSON ({e})") from e
            if not isinstance(row, dict):
                raise BadInput(f"{path}:{number}: not a JSON object")
            rows.append(row)
    return rows


def host_report(rows):
    """The counts of one host's rows, the disks it could not audit, the machine names seen."""
    counts = empty_counts()
    unaudited = []
    for row in rows:
        kind = row.get("kind")
        if kind == "disk":
            counts["disks"] += 1
            if "error" in row or row.get("audited") is False:
                counts["unaudited_disks"] += 1
                unaudited.append({"path": row.get("path"), "error": row.get("error", "")})
                continue
            if row.get("encryption", "none") == "none":
                continue
            counts["encrypted_disks"] += 1
            plaintext = row.get("plaintext_base_bytes") or 0
            if plaintext > 0:
                counts["leaning_disks"] += 1
                counts["plaintext_bytes"] += plaintext
        elif kind == "base":
            if (row.get("encrypted_instances") or 0) > 0:
                counts["base_plaintext_bytes"] += row.get("plaintext_bytes") or 0
    machines = sorted({row["host"] for row in rows if isinstance(row.get("host"), str)})
    return {**counts, "machines": machines, "unaudited": unaudited}


def input_files(paths):
    """The files named, and the `*.jsonl` files of the folders named."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            files.extend(sorted(glob.glob(os.path.join(glob.escape(path), "*.jsonl"))))
        else:
            files.append(path)
    return files


def fleet_report(paths, expect, limits):
    """The report of all hosts: per host (by file name), in total, and what is over a limit."""
    hosts = {}
    for path in input_files(paths):
        name = os.path.basename(path)
        name = name[: -len(".jsonl")] if name.endswith(".jsonl") else name
        if name in hosts:
            raise BadInput(f"{path}: a second file for host {name}")
        report = host_report(read_rows(path))
        stderr = os.path.splitext(path)[0] + ".stderr"
        report["messages"] = []
        if os.path.exists(stderr):
            with open(stderr, encoding="utf-8", errors="replace") as f:
                report["messages"] = [line for line in f.read().splitlines() if line.strip()]
        hosts[name] = report
    total = empty_counts()
    for report in hosts.values():
        for key in total:
            total[key] += report[key]
    missing = sorted(set(expect) - set(hosts))
    over = [
        {"host": name, "measure": measure, "value": report[measure], "limit": limit}
        for name, report in sorted(hosts.items())
        for measure, limit in limits.items()
        if report[measure] > limit
    ]
    return {
        "hosts": dict(sorted(hosts.items())),
        "total": {"hosts": len(hosts), **total},
        "missing_hosts": missing,
        "limits": limits,
        "over_limits": over,
    }


def table(rows):
    """Columns padded to the widest cell; the first column left, the others right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    return lines


def text(report):
    header = ["HOST", "DISKS", "ENCRYPTED", "LEANING", "PLAINTEXT", "UNAUDITED"]

    def cells(name, c):
        return [
            name,
            str(c["disks"]),
            str(c["encrypted_disks"]),
            str(c["leaning_disks"]),
            human(c["plaintext_bytes"]),
            str(c["unaudited_disks"]),
        ]

    rows = [header] + [cells(n, r) for n, r in report["hosts"].items()]
    rows.append(cells("total", report["total"]))
    lines = table(rows)
    lines.append("")
    lines.append(
        "LEANING: encrypted disks with guest data in plaintext bases; "
        "PLAINTEXT: that data, summed over them."
    )
    for name, r in report["hosts"].items():
        for disk in r["unaudited"]:
            lines.append(f"{name}: not audited: {disk['path']}: {disk['error']}")
        for message in r["messages"]:
            lines.append(f"{name}: {message}")
    lines.extend(failures(report))
    if report["limits"] and not failures(report):
        lines.append(f"every host is within the limits ({len(report['hosts'])} hosts)")
    return "\n".join(lines) + "\n"


def failures(report):
    """One line per host over a limit, and per expected host without an audit."""
    lines = [
        f"{name}: no audit (its task failed or it was unreachable)"
        for name in report["missing_hosts"]
    ]
    for o in report["over_limits"]:
        lines.append(
            f"{o['host']}: {LIMITS[o['measure']]}: {o['value']}, over the limit of {o['limit']}"
        )
    return lines


def names(text):
    """`a,b,c` as a list; empty text, no names."""
    return [n for n in text.split(",") if n]


def limit(text):
    """A limit: a count of bytes or disks; empty text (an unset Ansible variable), none."""
    if text.strip() == "":
        return None
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "paths", nargs="+", metavar="HOST.jsonl|DIR", help="one host's audit, or a folder of them"
    )
    parser.add_argument("--out", metavar="DIR", help="write DIR/fleet.json and DIR/fleet.txt")
    parser.add_argument(
        "--expect",
        type=names,
        default=[],
        metavar="HOST,...",
        help="hosts that must have a file (comma-separated)",
    )
    for measure in LIMITS:
        parser.add_argument(
            "--max-" + measure.replace("_", "-"),
            type=limit,
            metavar="N",
            help=f"fail when a host has more than N {LIMITS[measure]} (empty: no limit)",
        )
    args = parser.parse_args(argv)
    limits = {
        m: getattr(args, "max_" + m) for m in LIMITS if getattr(args, "max_" + m) is not None
    }
    try:
        report = fleet_report(args.paths, args.expect, limits)
    except (OSError, BadInput) as e:
        print(f"fleet_report: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    out = text(report)
    if args.out:
        with open(os.path.join(args.out, "fleet.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        with open(os.path.join(args.out, "fleet.txt"), "w", encoding="utf-8") as f:
            f.write(out)
    sys.stdout.write(out)
    if limits and failures(report):
        # The lines that fail the check, again on stderr: what the playbook's failure shows.
        sys.stderr.write("\n".join(failures(report)) + "\n")
        return EXIT_OVER_LIMIT
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
