"""`python -m cluster render SETTINGS --out DIR`: every file of cluster/ with the settings put in."""

import argparse
import sys
from pathlib import Path

from cluster.render import SettingsError, render


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    render_cmd = commands.add_parser("render", help="render the deployment files from a settings file")
    render_cmd.add_argument("settings", type=Path, help="a settings TOML file (see cluster/settings.toml)")
    render_cmd.add_argument("--out", type=Path, required=True, help="a folder that does not exist yet")
    args = parser.parse_args()
    try:
        written = render(args.settings, args.out)
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
