"""The house as docs/DESIGN.md draws it: which tool imports which, with no circle; the trainer
never imports the data tool; records.py, benchmarks.py and synthetic.py import none of the tools
(synthetic.py takes only the ARGUS judgement type from benchmarks.py, a pure formats module)."""
import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = ("records", "benchmarks", "synthetic", "gen_chains", "rank_dpo", "eval_judge")


def imports_of(path: str) -> set[str]:
    """Every module a file imports, at the top or inside a function (a lazy import is still an arrow)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found


def test_the_tools_import_each_other_as_drawn():
    arrows = {tool: imports_of(os.path.join(ROOT, tool + ".py")) & (set(TOOLS) | {"kernels"})
              for tool in TOOLS}
    assert arrows == {"records": set(),
                      "benchmarks": {"records"},
                      "synthetic": {"records", "benchmarks"},     # benchmarks: the ARGUS judgement type
                      # synthetic: --backend rules only; rank_dpo: --frames only (its video reader)
                      "gen_chains": {"records", "synthetic", "rank_dpo"},
                      "rank_dpo": {"records", "kernels", "synthetic"},   # synthetic: --model tiny only
                      "eval_judge": {"records", "benchmarks", "gen_chains", "rank_dpo",
                                     "synthetic"}}                # synthetic: --judge rules
    # no circle: a topological order exists
    order, left = [], dict(arrows)
    while left:
        ready = [t for t, deps in left.items() if deps <= set(order) | {"kernels"}]
        assert ready, f"an import circle among {sorted(left)}"
        order += ready
        for t in ready:
            del left[t]


def test_importing_a_tool_loads_only_what_it_needs():
    """The trainer does not load the data tool or the toy world; the judge-only commands of
    eval_judge.py load neither torch nor the trainer."""
    code = ("import sys, {mod}; print(sorted(m for m in ('gen_chains', 'synthetic', 'rank_dpo', "
            "'torch') if m in sys.modules))")
    seen = {mod: subprocess.run([sys.executable, "-c", code.format(mod=mod)], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout.strip()
            for mod in ("rank_dpo", "eval_judge", "gen_chains")}
    assert seen == {"rank_dpo": "['rank_dpo', 'torch']", "eval_judge": "['gen_chains']",
                    "gen_chains": "['gen_chains']"}
