"""The repository ships every document it cites, and ignores every folder its documented commands create.

Checked on the files of this checkout (paths relative to this test file, so a plain `git clone` with no
team folder beside it is what is tested): markdown links resolve (anchors included) inside the repo;
every `*.md` named in a markdown file, a python docstring or comment, or a shell/YAML comment exists in
the repo; no file cites the team's sibling reference folder; `git check-ignore` covers the outputs.
"""

from __future__ import annotations

import ast
import io
import re
import subprocess
import tokenize
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OUTPUT_NAMES = {"summary.md"}  # .md files the code writes into run dirs (Evaluation's summary), not docs
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
MD_NAME = re.compile(r"(?<![\w/.-])((?:\.{1,2}/)*[\w-]+(?:/[\w.-]+)*\.md)(?![\w-])")
# Built from pieces so that this file does not match itself.
SIBLING = re.compile(r"\.\./" + "shared" + r"\b|(?<![\w-])" + "shared" + r"/(?:docs|protocol)\b")


def _files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, timeout=60,
                             check=True).stdout
        names = [n for n in out.split("\0") if n]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file but the venv
        names = [str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file() and ".venv" not in p.parts]
    return [REPO / n for n in sorted(names) if (REPO / n).is_file()]


FILES = _files()


def _text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def _python_prose(src: str) -> str:
    """Docstrings and comments of a python source (where documents are cited), one per line."""
    parts = []
    tree = ast.parse(src)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                parts.append(doc)
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            parts.append(tok.string)
    return "\n".join(parts)


def _hash_comments(src: str) -> str:
    return "\n".join(line.split("#", 1)[1] for line in src.splitlines() if "#" in line)


def _prose(path: Path) -> str | None:
    text = _text(path)
    if text is None:
        return None
    if path.suffix == ".md":
        return text
    if path.suffix == ".py":
        return _python_prose(text)
    if path.suffix in (".sh", ".yaml", ".yml", ".toml"):
        return _hash_comments(text)
    return None


def _slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


def _anchors(md: Path) -> set[str]:
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", md.read_text(), re.M)}


def _inside(path: Path) -> bool:
    return path.resolve().is_relative_to(REPO)


def test_the_project_documents_exist():
    for name in ["README.md", "SFT.md", "RL.md", "CHECKPOINTS.md", "docs/DESIGN.md", "docs/PROTOCOL.md",
                 "docs/DATA.md", "docs/PERFORMANCE.md", "protocol/README.md"]:
        assert (REPO / name).is_file(), name
    assert len(list((REPO / "protocol" / "prompts").glob("*_v*.txt"))) >= 13


def test_markdown_links_resolve_inside_the_repo():
    checked, bad = 0, []
    for md in [f for f in FILES if f.suffix == ".md"]:
        text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)  # code is not a link
        for m in LINK.finditer(re.sub(r"`[^`\n]*`", "", text)):
            target = m.group(1)
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path_part, _, anchor = target.partition("#")
            dest = (md.parent / path_part) if path_part else md
            checked += 1
            if not _inside(dest) or not dest.exists():
                bad.append(f"{md.relative_to(REPO)}: ({target}) does not resolve inside the repo")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                bad.append(f"{md.relative_to(REPO)}: ({target}) no heading gives #{anchor}")
    assert not bad, "\n".join(bad)
    assert checked >= 5  # docs/PERFORMANCE.md, docs/DESIGN.md, protocol/README.md link to each other


def _resolves(name: str, cited_in: Path) -> bool:
    for base in (cited_in.parent, REPO, REPO / "docs"):
        dest = base / name
        if _inside(dest) and dest.is_file():
            return True
    return False


def test_every_cited_markdown_file_is_in_the_repo():
    checked, bad = 0, []
    for f in FILES:
        prose = _prose(f)
        if not prose:
            continue
        for m in MD_NAME.finditer(prose):
            name = m.group(1)
            if Path(name).name in OUTPUT_NAMES or Path(name).parts[0].isupper():  # outputs, OUT/table.md
                continue
            checked += 1
            if not _resolves(name, f):
                bad.append(f"{f.relative_to(REPO)}: cites {name}, which is not in the repo")
    assert not bad, "\n".join(bad)
    assert checked >= 50  # DESIGN.md / PROTOCOL.md / DATA.md are cited all over the code


def test_no_file_cites_the_team_folder_beside_the_checkout():
    bad = []
    for f in FILES:
        text = _text(f)
        if text is None:
            continue
        for i, line in enumerate(text.splitlines(), 1):
            if SIBLING.search(line):
                bad.append(f"{f.relative_to(REPO)}:{i}: {line.strip()[:120]}")
    assert not bad, "the repo must ship what it cites:\n" + "\n".join(bad)


def test_the_checks_catch_what_they_are_for(tmp_path):
    # The matchers themselves: a citation, a link and a sibling-folder path are found where they are.
    src = '"""See DESIGN.md and docs/NOPE.md."""\n# the math: PROTOCOL.md section 2\nx = "summary.md"\n'
    assert [m.group(1) for m in MD_NAME.finditer(_python_prose(src))] == ["DESIGN.md", "docs/NOPE.md",
                                                                          "PROTOCOL.md"]
    assert _resolves("DESIGN.md", REPO / "SFT" / "train_sft.py") and not _resolves("docs/NOPE.md", REPO / "x.py")
    assert LINK.findall("[a](b.md#c) ![img](x.png) [d](https://e)") == ["b.md#c", "https://e"]
    assert SIBLING.search("see ../" + "shared" + "/docs/DATA.md") and SIBLING.search("(shared" + "/protocol/prompts)")
    assert not SIBLING.search("shared its host with an SFT run")
    assert _slug("Performance: reference anchors and how to measure") == \
        "performance-reference-anchors-and-how-to-measure"


# ---- .gitignore: every output folder of the documented commands --------------------------------------

FIXED_OUTPUTS = [  # outputs the docs name in prose or shell defaults rather than as --out / run_dir
    "runs/x", "SFT/runs/x", "RL/runs/x", "Evaluation/runs/eval/x",  # run dirs, also when run from a tree
    "logs/x", "Evaluation/logs/vllm/x", "logs/judge/x",  # launch_vllm.sh LOG_DIR, serve_judge.sh LOG_DIR
    "Evaluation/dl3dv.json", "Evaluation/dl3dv_run/x",  # inference_dl3dv.py --result_file default + <stem>_run/
    "tiny_models/x", "shapes/x", "benchmarks/embedded/x", "checkpoints/x", "data/sft/x", "demo_out/x",
    "wandb/x", "outputs/x",
]


def _documented_outputs() -> set[str]:
    found = set()
    docs = [REPO / n for n in ("README.md", "SFT.md", "RL.md", "CHECKPOINTS.md")] + sorted(REPO.glob("docs/*.md"))
    for md in docs:
        for m in re.finditer(r"--(?:out|output_dir|run_dir)[ =]([\w./-]+)", md.read_text()):
            found.add(m.group(1))
    for y in sorted(REPO.glob("configs/**/*.yaml")):
        for m in re.finditer(r"^\s*(?:run_dir|output_dir|edit_cache_dir):\s*([\w./-]+)\s*$", y.read_text(), re.M):
            found.add(m.group(1))
    # placeholders (DIR, OUT) and absolute paths are not folders the docs create in the checkout
    return {p for p in found if not p.startswith("/") and not p.isupper() and p not in (".", "..")}


@pytest.mark.skipif(not (REPO / ".git").exists(), reason="needs a git checkout")
def test_gitignore_covers_every_documented_output():
    outputs = _documented_outputs()
    assert len(outputs) >= 15 and "runs/sft/klein9b_lora_r768" in outputs, sorted(outputs)
    paths = [f"{p.rstrip('/')}/x" for p in sorted(outputs)] + FIXED_OUTPUTS  # a file inside each folder
    res = subprocess.run(["git", "check-ignore", "--no-index", "-v", "--non-matching", *paths], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode in (0, 1), res.stderr
    not_ignored = [line.split("\t", 1)[1] for line in res.stdout.splitlines() if line.startswith("::")]
    assert not not_ignored, f".gitignore misses documented outputs: {not_ignored}"
    # and nothing tracked is ignored (a too-broad pattern would hide the project's own files)
    tracked = [str(f.relative_to(REPO)) for f in FILES]
    res = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], input="\n".join(tracked), cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert res.stdout.strip() == "", f"tracked files matched by .gitignore:\n{res.stdout}"
