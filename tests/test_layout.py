"""The layout's rules, read from the source: layers point one way, no module uses another's private names,
imports sit at the top of the file, and the library never reaches for the experiment configs or the
synthetic cohort."""

import ast
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("echoclip_jax", "data_prep")
# the only library package that may read the synthetic cohort's truth
SYNTHETIC_READERS = ("echoclip_jax.demo", "data_prep.synthetic")
# imported where they are used: the extras a user may not have installed
OPTIONAL = ("torch", "open_clip", "apache_beam", "presidio_analyzer", "spacy", "tensorflow")
MAX_LINES = 420
# the one module of echoclip_jax that data_prep may import: the storage layer both read and write files
# through, which imports no JAX and nothing else of echoclip_jax (checked below)
SHARED_BELOW = "echoclip_jax.runtime.storage"


def _modules():
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


MODULES = _modules()


def _imports(tree):
    """(module imported, names taken from it, node, at top level) of every import statement."""
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, [], node, id(node) in top
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module, [a.name for a in node.names], node, id(node) in top


def _parsed(name):
    return ast.parse(MODULES[name].read_text())


@pytest.mark.parametrize("name", sorted(MODULES))
def test_layers_point_one_way(name):
    for module, _, node, _ in _imports(_parsed(name)):
        where = f"{MODULES[name].relative_to(REPO)}:{node.lineno}"
        assert module.split(".")[0] != "configs", f"{where}: the library never imports the experiment configs"
        if (
            module.startswith("data_prep.synthetic")
            or module == "data_prep"
            and "synthetic" in [a.name for a in node.names]
        ):
            assert name.startswith(SYNTHETIC_READERS), f"{where}: only the demo reads the synthetic cohort"
        if (
            name.startswith("data_prep")
            and module != SHARED_BELOW
            and not (module == "echoclip_jax.runtime" and [a.name for a in node.names] == ["storage"])
        ):
            assert module.split(".")[0] not in ("echoclip_jax", "jax", "flax", "optax"), (
                f"{where}: data_prep runs without JAX and below the library (its files go through {SHARED_BELOW})"
            )
        if name == SHARED_BELOW:
            assert module.split(".")[0] not in ("echoclip_jax", "data_prep", "jax", "flax", "optax"), (
                f"{where}: the storage layer sits below both packages"
            )


def test_data_prep_runs_without_jax():
    """data_prep's commands (local workers, Beam on Dataflow) import no JAX, storage layer included."""
    code = (
        "import sys, data_prep.convert, data_prep.beam, data_prep.records, echoclip_jax.runtime.storage; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_uses_another_modules_private_names(name):
    tree = _parsed(name)
    aliases = {}
    for module, names, node, _ in _imports(tree):
        if module.split(".")[0] not in PACKAGES:
            continue
        for taken in names:
            assert not taken.startswith("_"), f"{MODULES[name].relative_to(REPO)}:{node.lineno}: {module}.{taken}"
        for a in node.names:
            aliases[a.asname or a.name.split(".")[-1]] = module
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            assert not (node.attr.startswith("_") and not node.attr.startswith("__")), (
                f"{MODULES[name].relative_to(REPO)}:{node.lineno}: {node.value.id}.{node.attr}"
            )


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_at_the_top_except_optional_dependencies(name):
    for module, _, node, top in _imports(_parsed(name)):
        assert top or module.split(".")[0] in OPTIONAL, (
            f"{MODULES[name].relative_to(REPO)}:{node.lineno}: import {module} inside a function"
        )


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_small(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name].relative_to(REPO)}: {lines} lines; split it by what it does"


def test_commands_sit_at_the_top_and_the_library_in_packages():
    top = sorted(p.stem for p in (REPO / "echoclip_jax").glob("*.py") if p.stem != "__init__")
    for stem in top:
        source = (REPO / "echoclip_jax" / f"{stem}.py").read_text()
        assert 'if __name__ == "__main__":' in source and "def main(" in source, f"{stem} is not a command"
    packages = sorted(p.name for p in (REPO / "echoclip_jax").iterdir() if (p / "__init__.py").exists())
    assert set(top).isdisjoint(packages)
    for package in packages:
        assert ast.get_docstring(ast.parse((REPO / "echoclip_jax" / package / "__init__.py").read_text())), package


def test_configs_are_files_not_an_installed_package():
    assert not (REPO / "configs" / "__init__.py").exists()
    setup = (REPO / "setup.py").read_text()
    assert '"configs"' not in setup and "../configs" not in setup
