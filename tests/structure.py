"""The project's structure, read from its source with `ast` (nothing is imported): modules and their imports, the
rooms (packages) and the floors they stand on, import circles, and the rules tests/test_structure.py holds the code
to. `python -m tests.structure` prints the house.

Every import counts, also one inside a function or under `if TYPE_CHECKING:`: a circle a type checker walks is
one a maintainer walks too.
"""
from __future__ import annotations

import ast
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("inference", "flare_common", "evaluation", "phantoms", "training", "benchmarks", "experiments")
TOOLING = ("evaluation", "phantoms", "training", "benchmarks", "experiments", "flare_common", "scripts")
SETTINGS_MODULE = "inference.settings"
# where `args.<flag>` may be read: the functions that turn a command line into typed records
COMMAND_LINE_FUNCTIONS = {"main", "run_options_from_args", "settings_from_args", "options_from_args"}


@dataclass
class Module:
    name: str
    path: Path
    tree: ast.Module
    imports: set[str] = field(default_factory=set)  # modules of the project this one imports


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def read_modules(packages=PACKAGES) -> dict[str, Module]:
    modules = {}
    for package in packages:
        for path in sorted((REPO / package).rglob("*.py")):
            if "results" in path.parts:
                continue
            modules[module_name(path)] = Module(module_name(path), path, ast.parse(path.read_text(), str(path)))
    for module in modules.values():
        module.imports = {target for target, _ in imported(module, modules)}
    return modules


def is_package(module: Module) -> bool:
    return module.path.name == "__init__.py"


def imported(module: Module, modules: dict[str, Module]) -> list[tuple[str, str | None]]:
    """(project module, name imported from it or None) for every import of `module` that lands in the project."""
    found = []
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    found.append((alias.name, None))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.name.split(".")
                base = base if is_package(module) else base[:-1]
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source not in modules:
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                found.append((submodule, None) if submodule in modules else (source, alias.name))
    return found


def circles(modules: dict[str, Module], within: str = "inference") -> list[list[str]]:
    """Import circles (strongly connected components of more than one module, or a module importing itself) among
    the modules of `within`, each sorted."""
    names = [name for name in modules if name == within or name.startswith(within + ".")]
    graph = {name: sorted(t for t in modules[name].imports if t in names) for name in names}
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(name):  # Tarjan's algorithm
        index[name] = low[name] = counter[0]
        counter[0] += 1
        stack.append(name)
        on_stack.add(name)
        for target in graph[name]:
            if target not in index:
                visit(target)
                low[name] = min(low[name], low[target])
            elif target in on_stack:
                low[name] = min(low[name], index[target])
        if low[name] == index[name]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == name:
                    break
            if len(component) > 1 or name in graph[name]:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for name in names:
        if name not in index:
            visit(name)
    return sorted(found)


def room(name: str) -> str:
    """The room a module lives in: its top package, or inference's subpackage (inference.model)."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "inference" and len(parts) > 2 else parts[0]


def floors(modules: dict[str, Module]) -> dict[str, int]:
    """Each room's floor: 0 for a room that imports no other room, else one above the highest room it imports (a room
    in a circle with another is reported at the floor of the circle's first visit)."""
    imports = defaultdict(set)
    for module in modules.values():
        for target in module.imports:
            if room(target) != room(module.name) and not (room(module.name).startswith(room(target) + ".")):
                imports[room(module.name)].add(room(target))
    rooms = sorted({room(name) for name in modules})
    level: dict[str, int] = {}

    def floor_of(name, seen=()):
        if name in level:
            return level[name]
        if name in seen:
            return 0
        level[name] = value = 1 + max((floor_of(t, (*seen, name)) for t in imports[name]), default=-1)
        return value

    return {name: floor_of(name) for name in rooms}


def environment_reads(module: Module) -> list[int]:
    """Lines where `module` reads or writes the process environment (os.environ, os.getenv, os.putenv)."""
    lines = []
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os" \
                and node.attr in ("environ", "getenv", "putenv", "unsetenv"):
            lines.append(node.lineno)
        if isinstance(node, ast.ImportFrom) and node.module == "os" and \
                any(alias.name in ("environ", "getenv", "putenv") for alias in node.names):
            lines.append(node.lineno)
    return sorted(lines)


def argument_reads(module: Module) -> list[tuple[int, str]]:
    """(line, function) where `args.<name>` is read outside the command-line functions (COMMAND_LINE_FUNCTIONS)."""
    found = []

    def walk(node, function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                walk(child, child.name)
                continue
            if isinstance(child, ast.Attribute) and isinstance(child.value, ast.Name) and child.value.id == "args" \
                    and function not in COMMAND_LINE_FUNCTIONS:
                found.append((child.lineno, function or "<module>"))
            walk(child, function)

    walk(module.tree, None)
    return found


def declared_public(module: Module) -> set[str] | None:
    """The names of the module's `__all__` (a literal list or tuple, or sorted(<dict literal>)), None without one."""
    for node in module.tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            value = node.value
            if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "sorted":
                value = value.args[0]
                if isinstance(value, ast.Name):  # sorted(_EXPORTS): the dict literal assigned to that name
                    value = next(n.value for n in module.tree.body if isinstance(n, ast.Assign)
                                 and any(isinstance(t, ast.Name) and t.id == value.id for t in n.targets))
            if isinstance(value, ast.Dict):
                return {key.value for key in value.keys}
            return {element.value for element in value.elts}
    return None


def private_uses(module: Module, modules: dict[str, Module]) -> list[tuple[int, str]]:
    """(line, what) for each name `module` takes from the engine (inference) that no `__all__` declares public: a
    name imported from an inference module, or `alias.name` used on an inference module imported as a name."""
    found = []
    aliases = {}  # local name -> inference module
    for node in ast.walk(module.tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        for target, name in imported(Module(module.name, module.path, ast.Module([node], []), set()), modules):
            if not target.startswith("inference"):
                continue
            if name is not None:
                public = declared_public(modules[target])
                if public is None or name not in public:
                    found.append((node.lineno, f"{target}.{name}"))
            else:
                local = next((a.asname or a.name.split(".")[-1] for a in node.names
                              if target.endswith(a.name.split(".")[-1])), target.split(".")[-1])
                if isinstance(node, ast.Import):
                    local = next((a.asname for a in node.names if a.name == target and a.asname), None)
                    if local is None:  # `import inference.io`: used as inference.io.name
                        aliases[target] = target
                        continue
                if declared_public(modules[target]) is None:
                    found.append((node.lineno, f"{target} (a module without __all__)"))
                aliases[local] = target
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Attribute):
            dotted = attribute_path(node.value)
            if dotted in aliases:
                public = declared_public(modules[aliases[dotted]]) or set()
                if node.attr not in public and f"{aliases[dotted]}.{node.attr}" not in modules:
                    found.append((node.lineno, f"{aliases[dotted]}.{node.attr}"))
    return sorted(set(found))


def attribute_path(node) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = attribute_path(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def tooling_modules(modules: dict[str, Module]) -> list[Module]:
    return [module for name, module in modules.items() if name.split(".")[0] in TOOLING]


def main() -> int:
    modules = read_modules()
    rooms = floors(modules)
    counts = defaultdict(int)
    for name in modules:
        counts[room(name)] += 1
    print(f"{len(rooms)} rooms on {max(rooms.values()) + 1} floors:")
    for floor in sorted(set(rooms.values()), reverse=True):
        print(f"  floor {floor}: " + ", ".join(f"{r} ({counts[r]})" for r in sorted(rooms) if rooms[r] == floor))
    found = circles(modules)
    print(f"import circles inside inference/: {len(found)}")
    for circle in found:
        print("  " + " <-> ".join(name.removeprefix("inference.") for name in circle))
    environment = {name: environment_reads(m) for name, m in modules.items()
                   if name.startswith("inference") and name != SETTINGS_MODULE and environment_reads(m)}
    print(f"process environment read outside {SETTINGS_MODULE}: "
          + (", ".join(f"{n} (lines {', '.join(map(str, lines))})" for n, lines in environment.items()) or "nowhere"))
    arguments = {name: argument_reads(m) for name, m in modules.items()
                 if name.startswith("inference") and argument_reads(m)}
    print("`args.` read below the command line: "
          + (", ".join(f"{n} ({len(reads)})" for n, reads in arguments.items()) or "nowhere"))
    private = {m.name: private_uses(m, modules) for m in tooling_modules(modules) if private_uses(m, modules)}
    taken = sorted({what for uses in private.values() for _, what in uses})
    print(f"names tooling takes from inference that no __all__ declares: {len(taken)}"
          + (" (" + ", ".join(taken) + ")" if taken else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
