"""The sweep stands beside training: `experiment_runner.py list` and `collect` load neither torch nor
Hydra, and the sweep's modules import each other without a loop."""
import ast
import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

SWEEP = ROOT / "src" / "sweep"


def test_list_and_collect_import_neither_torch_nor_hydra(tmp_path):
    run_dir = tmp_path / "runs" / "a"   # an ad-hoc run, as train.py leaves it
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("seed: 0\nalgo: {name: fedavg}\n")
    (run_dir / "metrics.jsonl").write_text(json.dumps({"round": 1, "test_accuracy": 0.5}) + "\n")
    (run_dir / "results.json").write_text(json.dumps({"final_test_accuracy": 0.5, "best_test_accuracy": 0.5,
                                                      "final_test_loss": 1.0, "train_time_s": 1.0}))
    script = (
        "import contextlib, io, sys\n"
        "import experiment_runner\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert experiment_runner.main(['list']) == 0\n"
        f"    assert experiment_runner.main(['collect', {str(tmp_path / 'runs')!r}]) == 0\n"
        "print(sorted(m for m in ('torch', 'hydra') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    assert (tmp_path / "runs" / "report.md").is_file()


def sweep_imports(path: Path) -> set[str]:
    """The src.sweep modules a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "src.sweep":
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("src.sweep."):
            found.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[2] for a in node.names if a.name.startswith("src.sweep.")}
    return found


def test_the_sweep_modules_import_each_other_without_a_loop():
    graph = {p.stem: sweep_imports(p) for p in SWEEP.glob("*.py")}

    def reaches(start: str, target: str, seen: set) -> bool:
        return any(m == target or (m not in seen and reaches(m, target, seen | {m})) for m in graph.get(start, ()))
    assert [m for m in graph if reaches(m, m, set())] == []
