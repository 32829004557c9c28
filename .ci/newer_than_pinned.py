"""Print the packages whose newest release (a `pip install --dry-run --report` file) differs from
the pin in a constraints file, as `name pinned->newest`, space-separated; nothing when none does."""

import json
import re
import sys


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main(report_path: str, constraints_path: str) -> None:
    pins = {}
    for line in open(constraints_path, encoding="utf-8"):
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[normalized(name)] = version.strip()
    report = json.load(open(report_path, encoding="utf-8"))
    changed = []
    for item in report.get("install", []):
        name, version = normalized(item["metadata"]["name"]), item["metadata"]["version"]
        if name in pins and pins[name] != version:
            changed.append(f"{name} {pins[name]}->{version}")
    print(" ".join(sorted(changed)))


if __name__ == "__main__":
    main(*sys.argv[1:3])
