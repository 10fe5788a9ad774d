"""Turn the unpacked ``pb1-detectron2==0.6`` sdist into a pure-Python package.

The sdist on the package index is upstream detectron2 v0.6 without its C++/CUDA
sources, so its ``setup.py`` cannot build the ``detectron2._C`` extension. None of
the operators behind ``_C`` (rotated boxes, deformable convolution, fast COCOeval)
are used by VoxelSplat, so we:

* drop ``ext_modules`` and the ``build_ext`` command class;
* point the model-zoo ``package_data`` at globs that exist in the sdist instead
  of a top-level ``configs/`` folder that is missing;
* stop installing the sdist's top-level ``tools`` package, which would shadow
  any other ``tools`` package on ``sys.path``;
* add ``detectron2/_C.py`` that raises ``NotImplementedError`` on use, so the
  failure is explicit rather than an ``ImportError`` deep inside detectron2.

Usage: ``python patch_detectron2_sdist.py SDIST_DIR`` (idempotent).
"""
import pathlib
import re
import sys

C_STUB = '''"""Placeholder for detectron2's compiled operators (not built in this install)."""


def get_compiler_version():
    return "none (detectron2 installed as pure Python)"


def get_cuda_version():
    return "none (detectron2 installed as pure Python)"


def has_cuda():
    return False


def __getattr__(name):
    raise NotImplementedError(
        f"detectron2._C.{name} is unavailable: this detectron2 was installed as pure Python "
        "(rotated boxes, deformable convolution and the fast COCO evaluator need the C++ extension)."
    )
'''


def patch(root: pathlib.Path) -> None:
    setup_py = root / "setup.py"
    if not setup_py.is_file():
        raise FileNotFoundError(f"{setup_py} not found: is {root} an unpacked pb1-detectron2 sdist?")
    text = setup_py.read_text()
    replacements = [
        (r"ext_modules=get_extensions\(\),", "ext_modules=[],"),
        (r"cmdclass=\{\"build_ext\": torch\.utils\.cpp_extension\.BuildExtension\},", ""),
        (
            r"package_data=\{\"detectron2\.model_zoo\": get_model_zoo_configs\(\)\},",
            'package_data={"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]},',
        ),
        (
            r"find_packages\(exclude=\(\"configs\", \"tests\*\"\)\)",
            'find_packages(exclude=("configs", "tests*", "tools", "tools.*"))',
        ),
    ]
    for pattern, repl in replacements:
        if re.search(pattern, text):
            text = re.sub(pattern, repl, text)
        elif repl and repl not in text:
            raise RuntimeError(f"{setup_py}: expected pattern {pattern!r} not found (unknown sdist?)")
    setup_py.write_text(text)
    (root / "detectron2" / "_C.py").write_text(C_STUB)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    patch(pathlib.Path(sys.argv[1]))
