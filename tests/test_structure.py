"""The shape of the code: the module graph has no cycle, no module imports another's private name, no stage
imports the exporter, and ``ptq --help`` does not load the pipeline."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in (("ptq", ROOT / "ptq"), ("ptq_cli", ROOT / "cli")):
        for f in folder.rglob("*.py"):
            parts = list(f.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg] + parts)] = f
    return out


def imports(name: str, path: Path, known: set[str]):
    """(imported module, names imported from it) for every import in the file, function-level ones too."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rsplit(".", 1)[0]
            mod = (base + ("." + node.module if node.module else "")) if node.level else node.module
            for a in node.names:  # `from . import x` may name a module
                if f"{mod}.{a.name}" in known:
                    yield f"{mod}.{a.name}", []
            yield mod, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def graph():
    mods = modules()
    known = set(mods)
    edges, private = {m: set() for m in mods}, []
    for m, path in mods.items():
        for target, names in imports(m, path, known):
            if target in known and target != m:
                edges[m].add(target)
                private += [f"{m} imports {target}.{n}" for n in names if n.startswith("_") and not n.endswith("__")]
    return edges, private


def test_no_import_cycle():
    edges, _ = graph()
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for t in sorted(edges[m]):
            if state.get(t) == "open":
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = "done"
    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_no_import_of_another_modules_private_name():
    _, private = graph()
    assert private == []


def test_stages_do_not_import_the_exporter_or_each_others_runner():
    edges, _ = graph()
    for m, targets in edges.items():
        if m.startswith("ptq.stages."):
            assert not targets & {"ptq.export", "ptq.run", "ptq.pipeline", "ptq.debug"}, (m, targets)


def test_cli_help_does_not_load_the_pipeline():
    code = ("import sys\nfrom ptq_cli.main import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('onnx', 'onnxruntime', 'numpy', 'ptq.pipeline') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "[]"


def test_cli_installs_as_ptq_cli_not_cli():
    p = subprocess.run([sys.executable, "-c", "import ptq_cli.main, importlib.util as u; "
                        "print(u.find_spec('cli') is None or 'site-packages' not in str(u.find_spec('cli').origin))"],
                       capture_output=True, text=True, cwd="/")
    assert p.stdout.strip() == "True", p.stderr
