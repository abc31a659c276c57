"""`python -m tiny.cached NAME [FOLDER]`: is the model NAME built for these sources?

Exit 0 and print its folder when the cache holds NAME at the current fingerprint, after copying
it from FOLDER (the `models/` of another cache: a host's, mounted into an image build) when it is
there and not here yet; exit 1 otherwise. Standard library only: the image build asks this
before installing the quantize environment it would need to build the model
(deploy/Dockerfile's first stage).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from tiny.build import cache_root, fingerprint


def cached(name: str, elsewhere: Path | None = None) -> Path | None:
    folder = f"{name}-{fingerprint(name)}"
    here = cache_root() / "models" / folder
    if not (here / "config.json").exists() and elsewhere is not None \
            and (elsewhere / folder / "config.json").exists():
        here.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(elsewhere / folder, here)
    return here if (here / "config.json").exists() else None


def main(argv: list[str]) -> int:
    found = cached(argv[0], Path(argv[1]) if len(argv) > 1 else None)
    if found is None:
        print(f"{argv[0]}: not built for these sources", file=sys.stderr)
        return 1
    print(found)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
