# Builds leaky_ext: python setup.py build_ext --build-lib DIR
from setuptools import Extension, setup

setup(
    name="leaky_ext",
    ext_modules=[Extension("leaky_ext", ["leaky_ext.c"], extra_compile_args=["-O2", "-g"])],
)
