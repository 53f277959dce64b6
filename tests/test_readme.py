"""Claims of the front page (README.md) and the user guide (docs/*.md) that code can check: the install
steps, the quick start (it runs as pasted), the two development commands, where a benchmark run
writes, that every measured table says where it came from, that every link resolves, and that the
guide lists what the code returns."""

import re
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = REPO / "docs"
RESULTS = REPO / "benchmarks" / "RESULTS.md"

if not README.is_file():
    pytest.skip("not a source checkout", allow_module_level=True)

GUIDE = sorted(DOCS.glob("*.md"))
# Everything a reader is sent to: the front page, the guide, the benchmarks' own pages.
PAGES = [README, *GUIDE, REPO / "benchmarks" / "README.md", RESULTS]


def section(text, title):
    """The markdown section whose heading starts with `title`, up to the next heading of its level."""
    match = re.search(rf"^(#+) {re.escape(title)}.*$", text, re.M)
    assert match, f"no section {title!r}"
    level = len(match.group(1))
    rest = text[match.end():]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.M)
    return rest[: end.start()] if end else rest


def code_blocks(text, lang=None):
    pattern = rf"```{lang}\n(.*?)```" if lang else r"```(?:bash|python)?\n(.*?)```"
    return re.findall(pattern, text, re.S)


def guide_page(name):
    return (DOCS / name).read_text()


def test_guide_has_its_pages():
    assert {p.name for p in GUIDE} >= {"README.md", "estimators.md", "distributed.md", "mixed-precision.md",
                                       "checkpoints.md", "hyperparameters.md", "edge-cases.md", "kernels.md",
                                       "integrations.md", "compile.md", "benchmarks.md"}


def test_readme_is_a_front_page():
    text = README.read_text()
    # A newcomer reads it in five minutes; the detail lives in docs/.
    assert len(text.splitlines()) <= 200, "README.md is the front page: move detail into docs/"
    assert [m.group(1) for m in re.finditer(r"^## (.*)$", text, re.M)] == [
        "Install", "Quick start", "Results", "Development: the two commands"]
    linked = set(re.findall(r"\]\(docs/([\w.-]+\.md)", text))
    assert linked == {p.name for p in GUIDE}, "the front page links every page of the guide"
    index = guide_page("README.md")
    assert set(re.findall(r"\]\(([\w.-]+\.md)\)", index)) >= {p.name for p in GUIDE} - {"README.md"}


def test_install_steps_install_numpy_before_building():
    install = section(README.read_text(), "Install")
    commands = [line for block in code_blocks(install) for line in block.splitlines()]
    build = next(i for i, line in enumerate(commands) if "--no-build-isolation ." in line)
    assert any("numpy" in line.split("#")[0] for line in commands[:build]), commands
    assert re.search(r"\bnumpy\b", (REPO / "scripts" / "setup.sh").read_text())


def test_repository_root_and_in_place_build_are_explained():
    install = " ".join(section(README.read_text(), "Install").split())
    assert "python setup.py build_ext --inplace" in install
    assert "pip install -e . --no-build-isolation --use-pep517" in install
    assert "repository root" in install
    # What shadows the install is sys.path[0]: the script's directory, or the cwd for -c/-m/the prompt.
    assert "the directory of the script it runs first on `sys.path` (whatever the working directory)" in install
    assert "the current directory for `python -c`, `python -m` and the interactive prompt" in install


def test_nothing_installs_esgd_cuda_from_a_package_index():
    # esgd_cuda is not on an index: `pip install "esgd_cuda[examples]"` cannot work, ".[examples]" does.
    for path in PAGES:
        for line in path.read_text().splitlines():
            assert not re.search(r"pip install [^.]*\besgd_cuda\b", line), f"{path.relative_to(REPO)}: {line}"


def test_quick_start_runs_as_pasted():
    """Both quick-start blocks, pasted one after the other into one interpreter, train."""
    blocks = code_blocks(section(README.read_text(), "Quick start"), "python")
    assert len(blocks) == 2 and "opt.backward(loss)" in blocks[0] and "opt.step(closure)" in blocks[1]
    torch.manual_seed(0)
    scope = {}
    exec(blocks[0], scope)
    exact = scope["opt"].diagnostics()[0]
    assert exact["hvp"] == "autograd" and exact["step"] == 100 and exact["estimates"] == 28, exact
    exec(blocks[1], scope)
    fd = scope["opt"].diagnostics()[0]
    assert fd["hvp"] == "finite_difference" and fd["step"] == 100 and fd["estimates"] == 28, fd
    assert fd["fd_h"] > 0 and torch.isfinite(scope["loss"])


def test_create_graph_reference_cycle_warning_is_explained():
    usage = " ".join(section(guide_page("estimators.md"), "The exact estimator").split())
    # torch's own words, so a user who sees the warning finds the explanation.
    assert "create a reference cycle between the parameter and its gradient" in usage
    assert "`opt.backward` never creates it" in usage


def test_diagnostics_section_lists_every_key():
    from esgd_cuda import ESGD

    p = torch.nn.Parameter(torch.ones(3))
    opt = ESGD([p])
    opt.backward((p ** 2).sum())
    opt.step()
    documented = set(re.findall(r"`(\w+)`", section(guide_page("hyperparameters.md"), "Diagnostics")))
    keys = {key for group in opt.diagnostics() for key in group}
    assert keys <= documented, f"opt.diagnostics() keys missing from docs/hyperparameters.md: {keys - documented}"


def test_two_commands_exist_and_their_claims_hold():
    dev = section(README.read_text(), "Development: the two commands")
    blocks = code_blocks(dev)
    assert blocks[0].strip() == "bash scripts/setup.sh && .venv/bin/python benchmarks/convergence.py"
    assert blocks[1].strip() == "bash scripts/setup.sh && bash scripts/test.sh"
    for path in ("scripts/setup.sh", "scripts/test.sh", "benchmarks/convergence.py"):
        assert (REPO / path).is_file(), path
    # Every paragraph of a numbered item is indented under it (markdown would end the list otherwise).
    items = dev[dev.index("1. "):]
    assert not re.search(r"^[^\s\d]", items, re.M), "an unindented line inside the numbered list"
    # Command 1 took 7 min 15 s on a fresh clone: no "under 5 minutes" anywhere.
    for path in (README, *GUIDE, REPO / "benchmarks" / "README.md", REPO / "benchmarks" / "convergence.py"):
        assert not re.search(r"(under|<) ?5 min", path.read_text()), path
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from _common import DEFAULT_OUT
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    assert f"`{DEFAULT_OUT.relative_to(REPO)}/`" in dev


def github_anchor(heading):
    """The id GitHub gives a heading: lower case, punctuation but hyphens dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("path", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(path):
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # an external address
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        assert dest.exists(), f"{path.name}: link to {target}: no such file"
        if anchor:
            assert dest.suffix == ".md", target
            anchors = {github_anchor(h) for h in re.findall(r"^#+ (.*)$", dest.read_text(), re.M)}
            assert anchor in anchors, f"{path.name}: link to {target}: no such heading in {dest.name}"


def tables(text):
    """For every markdown table: (its innermost section's heading and text, its top (# or ##) section's
    text, the table's header line)."""
    found, inner, top = [], [], []
    lines = text.splitlines()

    def span(start):
        level = len(lines[start].split(" ")[0])
        end = next((j for j in range(start + 1, len(lines)) if re.match(rf"^#{{1,{level}}} ", lines[j])), len(lines))
        return "\n".join(lines[start:end])

    for i, line in enumerate(lines):
        if re.match(r"^#{1,4} ", line):
            inner.append(i)
        if re.match(r"^#{1,2} ", line):
            top.append(i)
        if re.match(r"^\|[-:| ]+\|$", line) and i > 0:
            found.append((lines[inner[-1]], span(inner[-1]), span(top[-1]), lines[i - 1]))
    return found


PROVENANCE = re.compile(r"commit [0-9a-f]{7,12}\b")
COMMAND = re.compile(r"(?:python|bash) (?:benchmarks|scripts)/\S+")


def test_every_results_table_names_its_provenance():
    text = RESULTS.read_text()
    # The machine, the date and the commit of the measurements, once for the file.
    intro = text[: text.index("\n## ")]
    assert "AMD EPYC" in intro and re.search(r"20\d\d-\d\d-\d\d", intro) and PROVENANCE.search(intro)
    for heading, body, top, header in tables(text):
        if top.split("\n", 1)[1].lstrip().startswith("Not run yet"):
            # A form for a run to come: it names the command and asks for the commit.
            assert "bash benchmarks/gpu_suite.sh" in top and "git rev-parse HEAD" in top, heading
            continue
        assert COMMAND.search(body) or COMMAND.search(top), f"{heading} / {header}: no command named"


# Tables that are not measurements: what a build makes, the guide's index.
NOT_MEASURED = ("| torch build |", "| page | read it when |")


@pytest.mark.parametrize("path", [README, *GUIDE], ids=lambda p: str(p.relative_to(REPO)))
def test_every_guide_table_names_its_provenance(path):
    text = path.read_text()
    lines = text.splitlines()
    for heading, body, top, header in tables(text):
        first_row = lines[lines.index(header) + 2]
        # A table still to be measured says so in its first row, with the command that fills it.
        placeholder = "placeholder, not measured yet" in first_row and "python benchmarks/" in first_row
        measured = COMMAND.search(body) and PROVENANCE.search(body)
        # Counts a test computes (and asserts) are exact for the code, on any machine.
        counted = re.search(r"`tests/test_\w+\.py`", body) and "exact for the code" in body
        assert header.startswith(NOT_MEASURED) or placeholder or measured or counted, \
            f"{path.name}: table {header!r} under {heading!r} has no provenance"


def test_results_name_the_machine_date_and_commit():
    results = section(README.read_text(), "Results")
    assert re.search(r"commit [0-9a-f]{7}", results) and "python benchmarks/convergence.py" in results
    assert "AMD EPYC" in results and re.search(r"20\d\d-\d\d-\d\d", results)
    assert "No GPU numbers yet" in results  # benchmarks/RESULTS.md's first GPU run replaces this line
    bench = guide_page("benchmarks.md")
    assert "python benchmarks/step_time.py" in section(bench, "Optimizer step time")
    assert "AMD EPYC" in bench and re.search(r"20\d\d-\d\d-\d\d", bench)
    note = section(guide_page("hyperparameters.md"), "Numerical note")
    assert "tests/test_numerical_note.py" in note
