"""The package's layers hold: a module imports only from its own layer or inner ones (function-level imports
included), and no two modules import each other, directly or around a cycle. The layers are those of
docs/architecture.md; a new module must be placed in LAYERS before this test passes."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "grpo"

#: inner -> outer; a module may import from its own layer and the ones before it
LAYERS = [
    ("errors", ["grpo", "grpo.errors"]),
    # the math imports nothing of grpo's but errors, so the config can validate names against its registries
    ("math", ["grpo.algorithms"]),
    ("ground", ["grpo.config", "grpo.algorithm_config", "grpo.data", "grpo.rundir", "grpo.health_thresholds",
                "grpo.batch", "grpo.jsonl", "grpo.gsm8k", "grpo.convert", "grpo.bench"]),
    ("models", ["grpo.models"]),
    ("rollout+reward", ["grpo.rollout", "grpo.reward"]),  # grpo.rollout.tools: tool calls in the templates
    ("training", ["grpo.training"]),
    ("remote", ["grpo.remote"]),
    ("interfaces", ["grpo.api", "grpo.commands", "grpo.cli", "grpo.__main__"]),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(mod: str) -> int:
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and len(p) > best_len and (p != "grpo" or mod == "grpo"):
                best, best_len = i, len(p)
    if best is None:
        raise AssertionError(f"{mod} is in no layer: add it to LAYERS in tests/test_layering.py (and docs/architecture.md)")
    return best


def imports(path: Path, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("grpo")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("grpo") and node.level == 0:
            for a in node.names:  # `from grpo.algorithms import core` imports the module grpo.algorithms.core
                sub = f"{node.module}.{a.name}"
                out.add(sub if (PKG.parent / (sub.replace(".", "/") + ".py")).is_file() else node.module)
    return out


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_imports_point_inward(mod):
    mine = layer_of(mod)
    bad = [f"{dep} ({LAYERS[layer_of(dep)][0]})" for dep in sorted(imports(MODULES[mod]))
           if dep != "grpo" and layer_of(dep) > mine]
    assert not bad, f"{mod} ({LAYERS[mine][0]}) imports outer layers: {', '.join(bad)}"


def test_no_import_cycles():
    graph = {m: {d for d in imports(p) if d in MODULES and d != m and d != "grpo"} for m, p in MODULES.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_layers_themselves_are_checked():
    """The checker is not vacuous: an outer import in an inner module is caught."""
    assert layer_of("grpo.algorithms.core") < layer_of("grpo.training.trainer") < layer_of("grpo.api.app")
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("grpo.nowhere")
