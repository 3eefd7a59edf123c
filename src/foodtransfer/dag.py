"""dvc.yaml read once: its stages, what each reads and writes, and the code that produced a stage.

The DAG test, the sweep (which stages no swept param reaches) and the provenance of a run
(``code_version``: the hash of the code deps of the stages that produced its numbers) read
dvc.yaml through these functions, so they agree on what a stage depends on.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

DVC_YAML = "dvc.yaml"


def load_stages(root: Path) -> dict[str, dict[str, Any]]:
    """The ``stages`` of ``root``/dvc.yaml (empty when there is no dvc.yaml)."""
    import yaml

    path = root / DVC_YAML
    if not path.is_file():
        return {}
    return (yaml.safe_load(path.read_text()) or {}).get("stages", {}) or {}


def entries(items: list | None) -> list[str]:
    """The paths of a deps/outs/metrics/plots list (entries are strings or {path: options})."""
    return [item if isinstance(item, str) else next(iter(item)) for item in items or []]


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def producers(stages: dict[str, dict]) -> dict[str, str]:
    """{output path: the stage that writes it}, over outs, metrics and plots."""
    return {path: name for name, stage in stages.items()
            for kind in ("outs", "metrics", "plots") for path in entries(stage.get(kind))}


def direct_upstream(stages: dict[str, dict], name: str) -> set[str]:
    """The stages whose outputs stage ``name`` lists among its deps."""
    written = producers(stages)
    return {producer for dep in entries(stages[name].get("deps"))
            for out, producer in written.items() if _under(dep, out) and producer != name}


def upstream(stages: dict[str, dict], names: list[str]) -> list[str]:
    """``names`` and every stage they depend on, transitively, in dvc.yaml's order."""
    seen: set[str] = set()
    todo = [name for name in names if name in stages]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(direct_upstream(stages, name) - seen)
    return [name for name in stages if name in seen]


def params_read(stage: dict) -> list[str]:
    """The params.yaml keys a stage lists ("*": the whole file)."""
    read: list[str] = []
    for entry in stage.get("params", []) or []:
        if isinstance(entry, dict):
            for keys in entry.values():
                read += list(keys or ["*"])
        else:
            read.append(entry)
    return read


def uncached_outputs(stages: dict[str, dict], names: list[str]) -> list[str]:
    """The outputs, metrics and plots declared ``cache: false`` of the stages ``names``."""
    found = []
    for name in names:
        for kind in ("outs", "metrics", "plots"):
            for entry in stages[name].get(kind, []) or []:
                if isinstance(entry, dict):
                    for path, options in entry.items():
                        if (options or {}).get("cache") is False:
                            found.append(path)
    return found


def code_deps(stages: dict[str, dict], names: list[str]) -> list[str]:
    """The code files (``*.py``) among the deps of ``names`` and of every stage upstream of
    them: the code DVC hashes for those stages."""
    return sorted({dep for name in upstream(stages, names)
                   for dep in entries(stages[name].get("deps")) if dep.endswith(".py")})


def code_version(root: Path, names: list[str]) -> str | None:
    """A short hash of exactly the code that produced stage(s) ``names`` in the tree ``root``:
    their code deps and those of the stages upstream, as dvc.yaml lists them. An edit to
    code no such stage imports (the demo, compare) leaves it unchanged. None when ``root``
    has no dvc.yaml or lists none of ``names``."""
    stages = load_stages(root)
    files = code_deps(stages, names)
    if not files:
        return None
    digest = hashlib.sha256()
    for relative in files:
        path = root / relative
        content = path.read_bytes() if path.is_file() else b"<missing>"
        digest.update(relative.encode() + b"\0" + content + b"\0")
    return digest.hexdigest()[:12]
