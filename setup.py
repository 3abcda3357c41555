"""Build steps beyond the pure-Python package:
- the Cython decision core: native/core.pyx -> sidecar._core;
- this project's own gRPC API: proto/*.proto -> sidecar/_proto/*_pb2.py (grpcio-tools);
- the Lua scripts: lua/*.lua (run by Redis) copied into sidecar/lua/ and envoy/*.lua (run
  by Envoy's Lua filter) into sidecar/envoy/, so an installed sidecar carries them;
- the reference bench result: the measurements of bench/results/latest.json that `kt plan`
  reads (sidecar/bench_reference.json), so `kt plan` works outside a clone.
Generated files are not committed (.gitignore); every build makes them anew from
the sources above, so there is one source of each."""
import os
import shutil

from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def compile_protos() -> None:
    from grpc_tools import protoc  # a build requirement (pyproject.toml)

    src = os.path.join(HERE, "proto")
    out = os.path.join(HERE, "sidecar", "_proto")
    os.makedirs(out, exist_ok=True)
    open(os.path.join(out, "__init__.py"), "a").close()
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    for name in sorted(os.listdir(src)):
        if name.endswith(".proto"):
            rc = protoc.main(["grpc_tools.protoc", f"-I{src}", f"-I{include}",
                              f"--python_out={out}", f"--pyi_out={out}", name])
            if rc != 0:
                raise RuntimeError(f"protoc failed on proto/{name}")


def copy_lua() -> None:
    for folder in ("lua", "envoy"):
        src = os.path.join(HERE, folder)
        dst = os.path.join(HERE, "sidecar", folder)
        os.makedirs(dst, exist_ok=True)
        for name in os.listdir(src) if os.path.isdir(src) else []:
            if name.endswith(".lua"):
                shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))


def copy_bench_reference() -> None:
    import json

    src = os.path.join(HERE, "bench", "results", "latest.json")
    if not os.path.exists(src):  # an sdist without bench/: `kt plan` then says what to run
        return
    with open(src) as f:
        doc = json.load(f)
    ref = {"machine": doc.get("machine", {}), "configs": doc.get("configs", {}),
           "full_path": doc.get("full_path", {}), "source": "bench/results/latest.json"}
    with open(os.path.join(HERE, "sidecar", "bench_reference.json"), "w") as f:
        json.dump(ref, f, indent=1, sort_keys=True)


compile_protos()
copy_lua()
copy_bench_reference()

setup(
    ext_modules=cythonize(
        [Extension("sidecar._core", ["native/core.pyx"], extra_compile_args=["-O3"]),
         Extension("sidecar._als_wire", ["native/als_wire.pyx"], extra_compile_args=["-O3"])],
        compiler_directives={"language_level": "3"},
    ),
)
