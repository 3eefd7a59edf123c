"""dvc.yaml is a complete and exact DAG: every stage lists as deps every project module its
script imports (transitively, found with ``ast``: no TensorFlow needed) and every path it reads,
as outs every path it writes, and as params every key it reads, nothing more.

The params a stage reads are recorded by a real run (FOODTRANSFER_RECORD_PARAMS, see
``foodtransfer.config.record_reads``): the end-to-end test runs the pipeline so and checks
every stage with :func:`params_problems`.

Paths come from each stage's ``cmd``: its script's options are in the help panel "Inputs"
(deps), "Outputs" (outs) or "Cache" (neither). ``python tests/test_dag.py`` prints the deps
each stage should list.
"""

from __future__ import annotations

import ast
import importlib.util
import shlex
import sys
from pathlib import Path, PurePosixPath

import pytest

from foodtransfer.dag import entries, load_stages

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "foodtransfer"
SOURCE = REPO_ROOT / "src"


def module_file(name: str) -> Path | None:
    """The file of project module ``foodtransfer.x.y`` (a module or a package), or None."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    base = SOURCE.joinpath(*parts)
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _imported_names(path: Path, module: str) -> set[str]:
    """Every module name ``path`` may import, at the top or inside functions (a conservative
    reading: an import anywhere in the file counts). For ``from a import b`` both ``a`` and
    ``a.b`` are candidates (``b`` may be a submodule)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _with_parents(name: str) -> list[str]:
    """``a.b.c`` -> ``a``, ``a.b``, ``a.b.c``: importing a module runs its packages first."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def import_closure(script: Path) -> set[Path]:
    """The project files that running ``script`` may execute: its imports inside ``src/``,
    transitively, with the ``__init__.py`` of every package on the way."""
    seen: set[Path] = set()
    todo = [(script, "__main__")]
    while todo:
        path, module = todo.pop()
        for name in _imported_names(path, module):
            for candidate in _with_parents(name):
                found = module_file(candidate)
                if found is not None and found not in seen:
                    seen.add(found)
                    todo.append((found, candidate))
    return seen


def code_deps(script: Path) -> set[str]:
    """What a stage's deps must list as code: its script and every project module it may
    import. An empty ``__init__.py`` runs no code, so it need not be listed."""
    files = {script} | {path for path in import_closure(script)
                        if not (path.name == "__init__.py" and not path.read_text().strip())}
    return {path.relative_to(REPO_ROOT).as_posix() for path in files}


# ------------------------------------------------------------------------- dvc.yaml stages
def stages() -> dict[str, dict]:
    """dvc.yaml's stages, read as the sweep and ``code_version`` read them."""
    return load_stages(REPO_ROOT)


_entries = entries  # paths of a deps/outs/metrics list (strings or {path: options})


def script_of(stage: dict) -> Path:
    words = shlex.split(stage["cmd"])
    if words[:1] != ["python"] or not words[1].startswith("pipeline/"):
        raise AssertionError(f"cmd {stage['cmd']!r} does not run python pipeline/<stage>.py")
    return REPO_ROOT / words[1]


def cmd_paths(stage: dict) -> dict[str, set[str]]:
    """{panel: paths} of the path options given in ``stage``'s cmd, parsed by its script's own
    Typer command (so the panels are the ones its options declare)."""
    import typer.main

    from foodtransfer.stages.runner import CACHE, INPUT, OUTPUT

    script = script_of(stage)
    spec = importlib.util.spec_from_file_location(f"dag_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    command = typer.main.get_command(module.app)
    context = command.make_context(script.name, shlex.split(stage["cmd"])[2:])
    found: dict[str, set[str]] = {INPUT: set(), OUTPUT: set(), CACHE: set()}
    for option in command.params:
        panel = getattr(option, "rich_help_panel", None)
        if panel is None:
            continue
        values = context.params[option.name]
        values = values if isinstance(values, (list, tuple)) else [values]
        found[panel].update(PurePosixPath(str(value)).as_posix() for value in values)
    return found


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def dag_problems(name: str, stage: dict) -> list[str]:
    """What is missing from or extra in ``stage``'s deps and outs, each said in a sentence."""
    from foodtransfer.stages.runner import CACHE, INPUT, OUTPUT

    script = script_of(stage)
    problems = []
    if script.stem != name:
        problems.append(f"runs {script.relative_to(REPO_ROOT)}, not pipeline/{name}.py")
    deps = set(_entries(stage.get("deps")))
    code = {dep for dep in deps if dep.endswith(".py")}
    expected_code = code_deps(script)
    problems += [f"misses dep {path} (imported)" for path in sorted(expected_code - code)]
    problems += [f"lists dep {path}, which it does not import" for path in
                 sorted(code - expected_code)]
    paths = cmd_paths(stage)
    data_deps = deps - code
    outs = (set(_entries(stage.get("outs"))) | set(_entries(stage.get("metrics")))
            | set(_entries(stage.get("plots"))))
    for given, declared, kind in ((paths[INPUT], data_deps, "dep"),
                                  (paths[OUTPUT], outs, "out")):
        for path in sorted(given):
            if not any(_under(entry, path) for entry in declared):
                problems.append(f"misses {kind} {path} (its cmd passes it)")
        for entry in sorted(declared):
            if not any(_under(entry, path) for path in given):
                problems.append(f"lists {kind} {entry}, which its cmd does not pass")
    for path in sorted(paths[CACHE]):
        if any(_under(entry, path) for entry in deps | outs):
            problems.append(f"tracks the cache {path}, which must stay out of DVC")
    return problems


# Keys a stage reads only under other params than the end-to-end run's (the generated sample):
# the download stage reads data.url and data.md5 only for the real archive.
READ_ON_ANOTHER_PATH = {"download": {"data.url", "data.md5"}}


def params_problems(name: str, stage: dict, read: list[str]) -> list[str]:
    """What is missing from or extra in ``stage``'s params, given the keys it ``read``: a
    listed section must be read whole (else list its keys), a listed key must be read, and
    every key read must be listed (itself or its section). A stage that lists the whole file
    (``params.yaml:``, the report) is not checked."""
    listed = []
    for entry in stage.get("params") or []:
        if isinstance(entry, dict):
            return []  # a whole params file
        listed.append(entry)
    problems = []
    for key in read:
        if not any(key == entry or key.startswith(entry + ".") for entry in listed):
            problems.append(f"misses param {key} (read)")
    optional = READ_ON_ANOTHER_PATH.get(name, set())
    for entry in listed:
        under = [key for key in read if key == entry or key.startswith(entry + ".")]
        if entry in optional:
            continue
        if not under:
            problems.append(f"lists param {entry}, which it does not read")
        elif entry not in under:  # a section: every key of it must be read
            from foodtransfer.config import Params, flatten

            keys = [key for key in flatten(Params()) if key.startswith(entry + ".")]
            unread = sorted(set(keys) - set(under) - optional)
            if unread:
                problems.append(f"lists section {entry}, but does not read {', '.join(unread)}"
                                " (list the keys it reads)")
    return problems


def variant_problems(all_stages: dict[str, dict]) -> list[str]:
    """The registered variants (foodtransfer.variants) against dvc.yaml: each has a stage of
    its name, and the report stage's cmd names each one's outputs, in the registry's order
    (the report's pipeline order), and no other."""
    from foodtransfer.variants import NAMES

    problems = [f"variant {name} (registered) has no stage '{name}'" for name in NAMES
                if name not in all_stages]
    words = shlex.split(all_stages["report"]["cmd"])
    options = {"--metrics": "metrics/{}.json", "--plots": "plots/{}",
               "--artifacts": "artifacts/{}"}
    for option, pattern in options.items():
        given = [words[i + 1] for i, word in enumerate(words[:-1]) if word == option]
        expected = [pattern.format(name) for name in NAMES]
        for path in expected:
            if path not in given:
                problems.append(f"the report stage's cmd misses {option} {path} (a registered "
                                "variant)")
        for path in given:
            if path not in expected:
                problems.append(f"the report stage's cmd passes {option} {path}, which is not "
                                "a registered variant's (src/foodtransfer/variants.py)")
        if not problems and given != expected:
            problems.append(f"the report stage's cmd gives {option} in another order than the "
                            f"registry: {given} (registry: {expected})")
    return problems


STAGES = list(stages())


@pytest.mark.parametrize("name", STAGES)
def test_stage_deps_and_outs_are_exactly_what_it_imports_reads_and_writes(name: str) -> None:
    problems = dag_problems(name, stages()[name])
    assert not problems, f"dvc.yaml stage '{name}': " + "; ".join(problems)


def test_the_report_stage_declares_every_file_it_publishes() -> None:
    """DVC caches and restores exactly what the report publishes: a restored report (run
    cache, a clone) has its run.json, which names the pipeline run it belongs to."""
    from foodtransfer.stages.report import REPORT_FILES

    assert set(_entries(stages()["report"]["outs"])) == {f"reports/{name}"
                                                         for name in REPORT_FILES}


def test_the_report_stage_reads_exactly_the_registered_variants() -> None:
    problems = variant_problems(stages())
    assert not problems, "dvc.yaml: " + "; ".join(problems)


def test_the_variant_checker_names_what_is_missing() -> None:
    all_stages = {name: dict(spec) for name, spec in stages().items()}
    all_stages["report"]["cmd"] = all_stages["report"]["cmd"].replace(
        "--metrics metrics/dropout.json", "--metrics metrics/wide.json")
    del all_stages["finetune"]
    problems = variant_problems(all_stages)
    assert "variant finetune (registered) has no stage 'finetune'" in problems
    assert ("the report stage's cmd misses --metrics metrics/dropout.json (a registered "
            "variant)") in problems
    assert any("passes --metrics metrics/wide.json, which is not a registered" in problem
               for problem in problems)


def test_every_stage_has_a_script_and_a_module_of_its_name() -> None:
    for name in STAGES:
        assert (REPO_ROOT / "pipeline" / f"{name}.py").is_file(), name
        module = SOURCE / PACKAGE / "stages" / f"{name}.py"
        assert module.is_file(), f"stage {name}: no {module.relative_to(REPO_ROOT)}"
        assert str(module.relative_to(REPO_ROOT)) in code_deps(script_of(stages()[name]))


def test_the_checker_finds_a_deleted_dep(tmp_path: Path) -> None:
    stage = dict(stages()["transfer"])
    stage["deps"] = [dep for dep in stage["deps"] if dep != "src/foodtransfer/evaluation.py"]
    assert "misses dep src/foodtransfer/evaluation.py (imported)" in dag_problems("transfer",
                                                                                  stage)
    stage = dict(stages()["transfer"])
    stage["deps"] = [dep for dep in stage["deps"] if dep != "data/features"]
    assert "misses dep data/features (its cmd passes it)" in dag_problems("transfer", stage)
    stage = dict(stages()["split"])
    stage["outs"] = stage["outs"] + ["data/extra"]
    assert "lists out data/extra, which its cmd does not pass" in dag_problems("split", stage)


def test_the_params_checker_names_a_missing_or_extra_key() -> None:
    stage = dict(stages()["transfer"])
    read = ["backbone", "data.seed", "features.crop", "features.tta", "features.views", "seed"]
    stage["params"] = ["backbone", "features", "seed", "epochs"]
    assert params_problems("transfer", stage, read) == [
        "misses param data.seed (read)", "lists param epochs, which it does not read"]
    stage["params"] = ["backbone", "data.seed", "features", "seed"]
    assert params_problems("transfer", stage, read[:-2] + ["seed"]) == [
        "lists section features, but does not read features.views (list the keys it reads)"]
    assert params_problems("transfer", stage, read) == []
    assert params_problems("report", stages()["report"], ["seed"]) == []


def test_import_closure_follows_relative_and_nested_imports(tmp_path: Path) -> None:
    closure = {path.relative_to(SOURCE).as_posix() for path in
               import_closure(REPO_ROOT / "pipeline" / "dropout.py")}
    # dropout -> stages.dropout -> stages.transfer -> results -> tracking.runs -> tracking.store
    assert {"foodtransfer/stages/dropout.py", "foodtransfer/stages/transfer.py",
            "foodtransfer/results.py", "foodtransfer/tracking/runs.py",
            "foodtransfer/tracking/store.py", "foodtransfer/evaluation.py"} <= closure
    assert "foodtransfer/stages/report.py" not in closure


if __name__ == "__main__":  # print what each stage's deps should list
    sys.path.insert(0, str(SOURCE))
    for stage_name, spec in stages().items():
        print(f"{stage_name}:")
        for dep in sorted(code_deps(script_of(spec))):
            print(f"      - {dep}")
