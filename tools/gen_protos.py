"""Regenerates the Python stubs (and their .pyi types) from protos/ into libs/genproto/.

`--check` generates into a scratch folder and exits 1 if the committed stubs differ, so a proto
change without regenerated stubs fails the tests. `--deps-only` just lays out the google/api and
google/rpc sources (taken from the installed googleapis-common-protos) for buf.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
DEPS = ROOT / ".build" / "protodeps"
OUT = ROOT / "libs" / "genproto"
GOOGLE_DIRS = ("google/api", "google/rpc")


def lay_out_deps() -> Path:
    """Copies the .proto sources of googleapis-common-protos; nothing of them is committed."""
    import google.api.annotations_pb2 as anchor  # googleapis-common-protos ships its .proto files

    site = Path(anchor.__file__).resolve().parent.parent.parent
    for rel in GOOGLE_DIRS:
        dest = DEPS / rel
        dest.mkdir(parents=True, exist_ok=True)
        for src in (site / rel).glob("*.proto"):
            shutil.copyfile(src, dest / src.name)
    return DEPS


def generate(out: Path) -> None:
    deps = lay_out_deps()
    well_known = Path(str(resources.files("grpc_tools") / "_proto"))
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    out.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{deps}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        "--mypy_grpc_out=only_async:" + str(out),
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for package in {Path(s).parent for s in sources}:
        for part in [package, *package.parents][:-1]:
            (out / part / "__init__.py").touch()
    (out / "py.typed").touch()


def write_descriptor(path: Path) -> None:
    """A FileDescriptorSet with imports, for Envoy's gRPC-JSON transcoder."""
    deps = lay_out_deps()
    well_known = Path(str(resources.files("grpc_tools") / "_proto"))
    sources = sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / "kiln" / "v1").glob("*.proto"))
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{deps}",
        f"-I{well_known}",
        "--include_imports",
        f"--descriptor_set_out={path}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def tree(root: Path) -> dict[str, Path]:
    return {
        str(p.relative_to(root)): p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    }


def check() -> int:
    with tempfile.TemporaryDirectory() as scratch:
        fresh = Path(scratch) / "genproto"
        generate(fresh)
        want, have = tree(fresh), tree(OUT)
        stale = sorted(
            name
            for name in want.keys() | have.keys()
            if name not in want or name not in have or not filecmp.cmp(want[name], have[name], shallow=False)
        )
    if stale:
        print("stale generated stubs (run `make protos`):", *stale, sep="\n  ")
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--deps-only", action="store_true")
    parser.add_argument("--descriptor-out", type=Path, help="write a descriptor set for Envoy instead")
    args = parser.parse_args()
    if args.descriptor_out:
        write_descriptor(args.descriptor_out)
        return 0
    if args.deps_only:
        lay_out_deps()
        return 0
    if args.check:
        return check()
    if OUT.exists():
        shutil.rmtree(OUT)
    generate(OUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
