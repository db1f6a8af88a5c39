"""Copy diffusers and the packages it needs beyond requirements.txt into .device_site/, for a GPU machine that
has our requirements but no diffusers and no internet (benchmarks/device_check.sh puts the folder on
PYTHONPATH; carry it with the working tree).

    pip install -r benchmarks/requirements.txt      # here, where there is an index
    python benchmarks/stage_device_site.py           # -> .device_site/ (about 41 MiB), then carry ".device_site"

It copies each distribution's own files (code and .dist-info, which diffusers reads at import to check
versions), never __pycache__, for every package in diffusers' dependency closure that requirements.txt's
closure lacks. Compiled parts (safetensors, PyYAML, charset_normalizer, regex) are built for this Python:
the target must run the same Python minor version, which the script prints.
"""
import os
import re
import shutil
import sys
from importlib import metadata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common import ArgumentParser, UserError, run_main  # noqa: E402

MARKER = ".staged_by_guidedemotion"   # a folder holding it was made here and may be replaced
NOT_NEEDED = {"hf-xet"}      # the Hub's download accelerator (11 MB): imported only to download, never here


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(names) -> set:
    """Installed distributions reachable from ``names`` through their unconditional or platform-met requirements."""
    seen, todo = set(), [canonical(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue                                  # optional here, or not installed: not ours to copy
        seen.add(name)
        for req in dist.requires or []:
            spec, _, marker = req.partition(";")
            if "extra ==" in marker:                  # extras are not installed by a plain requirement
                continue
            todo.append(canonical(re.split(r"[\s<>=!~\[(]", spec.strip(), maxsplit=1)[0]))
    return seen


def requirement_names(path: str) -> list:
    with open(path) as f:
        return [re.split(r"[\s<>=!~\[;]", line.strip(), maxsplit=1)[0] for line in f
                if line.strip() and not line.startswith(("#", "-"))]


def main() -> int:
    p = ArgumentParser(__doc__)
    p.add_argument("--out", default=os.path.join(ROOT, ".device_site"),
                   help="folder to fill; an earlier one made by this script is replaced, any other is refused")
    args = p.parse_args()
    if os.path.lexists(args.out) and (os.path.islink(args.out) or not os.path.isdir(args.out) or (
            os.listdir(args.out) and not os.path.isfile(os.path.join(args.out, MARKER)))):
        raise UserError(f"--out '{args.out}' exists and was not made by this script; give a new folder")
    try:
        metadata.distribution("diffusers")
    except metadata.PackageNotFoundError:
        raise UserError("diffusers is not installed here; pip install -r benchmarks/requirements.txt") from None
    if os.path.isdir(args.out):
        shutil.rmtree(args.out)
    have = closure(requirement_names(os.path.join(ROOT, "requirements.txt")))
    stage = sorted(closure(["diffusers"]) - have - NOT_NEEDED)
    os.makedirs(args.out)
    open(os.path.join(args.out, MARKER), "w").close()
    total = 0
    for name in stage:
        dist = metadata.distribution(name)
        for f in dist.files or []:
            src = str(dist.locate_file(f))
            if "__pycache__" in f.parts or not os.path.isfile(src) or ".." in f.parts:
                continue                              # bytecode, and console scripts outside site-packages
            dst = os.path.join(args.out, *f.parts)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy2(src, dst)
            total += os.path.getsize(dst)
    print(f"staged {', '.join(stage)} into {args.out}: {total / 2 ** 20:.1f} MiB, for Python "
          f"{sys.version_info.major}.{sys.version_info.minor}")
    return 0


if __name__ == "__main__":
    run_main(main)
