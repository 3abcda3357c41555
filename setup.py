"""Builds the Cython decision core (native/core.pyx -> sidecar._core) and ships
the Lua scripts from lua/ inside the package, so an installed sidecar carries
everything it loads at run time."""
import os
import shutil

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


class BuildPyWithLua(build_py):
    """Copy lua/*.lua into sidecar/lua/ so package data finds them."""

    def run(self):
        src = os.path.join(HERE, "lua")
        dst = os.path.join(HERE, "sidecar", "lua")
        if os.path.isdir(src):
            os.makedirs(dst, exist_ok=True)
            for name in os.listdir(src):
                if name.endswith(".lua"):
                    shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
        super().run()


setup(
    cmdclass={"build_py": BuildPyWithLua},
    ext_modules=cythonize(
        [Extension("sidecar._core", ["native/core.pyx"], extra_compile_args=["-O3"])],
        compiler_directives={"language_level": "3"},
    ),
)
