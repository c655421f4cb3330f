"""Build hooks: generate the CSI gRPC modules from ``src/cargohold/adapters/csi/csi.proto``;
compile the C extensions (``core/_xts.c``, ``core/_frames.c``, ``stores/_diskreads.c``,
``stores/_blockio.c``, ``adapters/dataserver/_fastio.c``,
``services/engine/_fusering.c``).

Everything else about the package is in pyproject.toml. ``build_py`` runs ``grpc_tools.protoc``
(a build requirement, pinned in pyproject.toml) and writes ``csi_pb2.py``, ``csi_pb2.pyi`` and
``csi_pb2_grpc.py`` next to the proto: into the build directory for a wheel, into ``src/``
for an editable install (``pip install -e .``), which imports from the source tree. The
generated files are never committed (.gitignore) nor edited.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

SRC = Path(__file__).resolve().parent / "src"
PROTOS = ["cargohold/adapters/csi/csi.proto"]


def generate(out: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    for proto in PROTOS:
        (out / proto).parent.mkdir(parents=True, exist_ok=True)
        argv = ["grpc_tools.protoc", f"--proto_path={SRC}", f"--proto_path={well_known}",
                f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}",
                str(SRC / proto)]
        if protoc.main(argv) != 0:
            raise SystemExit(f"protoc failed on {proto}")


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        super().run()  # copies the sources; does nothing in editable mode
        generate(SRC if self.editable_mode else Path(self.build_lib))


# AES-XTS of whole blocks for encrypted volumes (core/cipher.py); optional: without a C
# compiler or OpenSSL's headers the build goes on and cipher.py uses OpenSSL through ctypes.
XTS = Extension("cargohold.core._xts", ["src/cargohold/core/_xts.c"], libraries=["crypto"],
                extra_compile_args=["-O2"], optional=True)

# Reads of replica files in threads without the GIL, for the data server
# (stores/diskreads.py); optional too: without it Python threads do them. Warnings are errors.
STRICT = ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Werror"]
DISK_READS = Extension("cargohold.stores._diskreads", ["src/cargohold/stores/_diskreads.c"],
                       extra_compile_args=STRICT, optional=True)
# The data protocol's frame headers decoded in C (core/wire.py); optional, warnings as errors.
FRAMES = Extension("cargohold.core._frames", ["src/cargohold/core/_frames.c"],
                   extra_compile_args=STRICT, optional=True)

# FUSE over io_uring for the engine's FUSE session (services/engine/fuse.py); optional too.
FUSE_RING = Extension("cargohold.services.engine._fusering",
                      ["src/cargohold/services/engine/_fusering.c"], extra_compile_args=STRICT,
                      optional=True)

# A replica's plain writes and cached reads (stores/blockio.py), and the data server's
# requests that are such I/O served without Python (adapters/dataserver/fastio.py), which
# calls the former through a capsule (stores/blockio.h); optional, warnings as errors.
BLOCK_IO = Extension("cargohold.stores._blockio", ["src/cargohold/stores/_blockio.c"],
                     extra_compile_args=STRICT, optional=True)
FAST_IO = Extension("cargohold.adapters.dataserver._fastio",
                    ["src/cargohold/adapters/dataserver/_fastio.c"],
                    include_dirs=["src/cargohold/stores"], extra_compile_args=STRICT,
                    optional=True)

setup(cmdclass={"build_py": BuildPyWithProtos},
      ext_modules=[XTS, DISK_READS, FRAMES, FUSE_RING, BLOCK_IO, FAST_IO])
