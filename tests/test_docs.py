"""The design lives in the repository, in docs/ARCHITECTURE.md.  No file may send a reader
to a design document that a clone does not have, and every citation of
docs/ARCHITECTURE.md must name a section that exists there.  Section numbers are stable,
so the comments that cite them stay true."""
import re
import subprocess

from kvmrr_log.paths import REPO

ARCHITECTURE = REPO / "docs" / "ARCHITECTURE.md"

# Built from pieces, so that this file does not contain what it forbids.  "§" may also be
# written as the JSON escape \u00a7.
SECTION_SIGN = r"(?:§|\\u00a7)"
STALE = {
    "the old design document's sections": re.compile("DESIGN" + r"[ \t]*" + SECTION_SIGN),
    "a path outside the checkout": re.compile(r"\.\./" + "shared"),
}
# "ARCHITECTURE §6.2", "docs/ARCHITECTURE.md §4", "ARCHITECTURE.md \u00a78"
CITATION = re.compile(r"ARCHITECTURE(?:\.md)?[ \t]*" + SECTION_SIGN + r"[ \t]*(\d+(?:\.\d+)*)")
HEADING = re.compile(r"^#{2,6} (\d+(?:\.\d+)*)\.? ", re.MULTILINE)

# The released schemas are frozen as released (schemas/README.md: never edit a file in
# history/).  Their doc strings cite §2 of the old design document, which is §2 of
# docs/ARCHITECTURE.md too.
FROZEN = ("schemas/history/",)


# where nothing of the project's own text lives, for a tree that is not a git checkout
BUILT = {".git", ".venv", "build", "__pycache__", ".pytest_cache"}


def _files() -> list[str]:
    """Every file of the checkout that git tracks or would track (not ignored)."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                             cwd=REPO, capture_output=True, text=True, check=True).stdout
        listed = out.splitlines()
    except (OSError, subprocess.CalledProcessError):
        listed = [str(p.relative_to(REPO)) for p in REPO.rglob("*")
                  if not BUILT & set(p.relative_to(REPO).parts)]
    return sorted({rel for rel in listed if (REPO / rel).is_file()})


def _texts():
    for rel in _files():
        if rel.startswith(FROZEN):
            continue
        try:
            yield rel, (REPO / rel).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue        # images and other binary files


def _sections() -> set[str]:
    return set(HEADING.findall(ARCHITECTURE.read_text(encoding="utf-8")))


def test_the_architecture_has_numbered_sections_in_order():
    numbers = HEADING.findall(ARCHITECTURE.read_text(encoding="utf-8"))
    top = [int(n) for n in numbers if "." not in n]
    assert top == list(range(1, len(top) + 1)), f"top-level sections out of order: {top}"
    assert len(numbers) == len(set(numbers)), "a section number is used twice"
    for n in numbers:
        if "." in n:
            assert n.rsplit(".", 1)[0] in numbers, f"§{n} has no parent section"


def test_no_file_cites_a_design_document_outside_the_checkout():
    found = [f"{rel}:{text.count(chr(10), 0, m.start()) + 1}: {what} ({m.group(0)!r})"
             for rel, text in _texts()
             for what, pattern in STALE.items()
             for m in pattern.finditer(text)]
    assert not found, "cite docs/ARCHITECTURE.md §N instead:\n" + "\n".join(found)


def test_every_citation_names_an_existing_section():
    sections = _sections()
    bad = [f"{rel}:{text.count(chr(10), 0, m.start()) + 1}: §{m.group(1)}"
           for rel, text in _texts()
           for m in CITATION.finditer(text)
           if m.group(1) not in sections]
    assert not bad, (f"docs/ARCHITECTURE.md has sections {sorted(sections)}; these cite "
                     "others:\n" + "\n".join(bad))


def test_the_architecture_cites_its_own_sections_correctly():
    text = ARCHITECTURE.read_text(encoding="utf-8")
    sections = _sections()
    bad = sorted({n for n in re.findall(r"§(\d+(?:\.\d+)*)", text) if n not in sections})
    assert not bad, f"docs/ARCHITECTURE.md refers to sections it lacks: {bad}"


def test_the_readme_links_the_docs():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for page in ("docs/ARCHITECTURE.md", "docs/operating.md", "docs/guests.md"):
        assert f"]({page})" in readme, f"README.md does not link {page}"
        assert (REPO / page).is_file()
