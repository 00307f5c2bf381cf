"""Every program the project calls is in setup/programs.tsv, which setup/doctor installs from.

The check reads the code; it runs nothing.  It looks where a program can be named:

- the Makefiles' recipes (variables expanded as make would: $(CC) is cc, $(PY) the venv's
  python) and the shell scripts: the command word of every simple command, including those
  in $(...), after `exec`, `command -v`, `setsid`, ..., and in `sh -c '...'`;
- the Python code (tests, harness, bench, the packages, compose/kafka/kafkactl): argv[0]
  of every subprocess / os.exec* call, followed through local names, module constants
  (`[*COMPOSE, ...]`) and functions of the same file that return an argv or a
  shutil.which("name"); every shutil.which("name"); the script of `["sh", "-c", S]`;
- the `#!` line of every script.

An argv[0] the reader cannot follow to a name (a parameter, a computed path) fails the test
unless UNFOLLOWED below says why that call starts no program from PATH.  Not read:
compose/images/kvmrr-node and the Dockerfiles, which run inside the images, whose programs
the Dockerfiles install.
"""
from __future__ import annotations

import ast
import functools
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvmrr_log.paths import REPO

LIST = REPO / "setup" / "programs.tsv"
MAKEFILES = ["Makefile", "guests/Makefile"]
SCRIPTS = ["compose/images/build", "compose/images/engine", "setup/doctor", "guests/linux/build"]
PY_DIRS = ["tests", "harness", "bench", "kvmrr", "kvmrr_log", "recorder", "replayer",
           "libkvmrr", "schemas", "guests/test"]
PY_FILES = ["compose/kafka/kafkactl", "compose/kafka/kafkasecrets.py", "setup.py"]

# argv[0] expressions the reader cannot follow, each with why no PATH program hides there
UNFOLLOWED = {
    ("harness/ftcluster.py", "wrap(cmd)"):
        "wrap is the caller's argv builder: tests/netcut.py's wrap, read via ARGV_BUILDERS",
    ("compose/kafka/kafkactl", "Path(jh) / 'bin' / 'java'"):
        "$JAVA_HOME/bin/java when JAVA_HOME is set; otherwise find_java() takes shutil.which('java')",
    ("compose/kafka/kafkactl", "java"):
        "check_java_version's parameter: the java find_java() found",
    ("tests/netcut.py", "inner"):
        "sys.executable running tests/netcut.py inner (the forwarder in the namespace)",
    ("tests/netcut.py", "shlex.join(cmd)"):
        "the wrapped argv: a kvmrr command line (harness/ftcluster.py), read where it is built",
    ("guests/test/test_guests.py", "host_bin"):
        "the host test binary guests/Makefile builds (--host-bin)",
}
# functions whose return value is an argv, though no subprocess call in their file uses it
ARGV_BUILDERS = {"tests/netcut.py": ["wrap"]}

SHELL_BUILTINS = set("""
    . : [ alias bg break builtin cd command continue declare echo eval exec exit export false
    fg getopts hash jobs kill let local printf pwd read readonly return set shift source test
    times trap true type typeset ulimit umask unalias unset wait
""".split())
SHELL_KEYWORDS = set("! { } [[ ]] case do done elif else esac fi for function if in select "
                     "then time until while".split())
# words after which the next word is a command again
COMMAND_PREFIXES = {"exec", "command", "builtin", "setsid", "nohup", "env", "sudo", "xargs",
                    "nice", "time", "!", "then", "do", "else", "elif", "if", "while", "until",
                    "{"}
OPERATORS = {";", "&&", "||", "|", "&", "(", ")", ";;", "\n", "|&"}


# ------------------------------------------------------------------ the list

@dataclass
class Row:
    program: str
    package: str
    group: str
    check: str


def read_list(path: Path = LIST) -> dict[str, Row]:
    rows = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        cols = line.split("\t")
        assert 3 <= len(cols) <= 4, f"{path}: not program<TAB>package<TAB>group[<TAB>check]: {line!r}"
        row = Row(*cols, *([""] * (4 - len(cols))))
        rows[row.program] = row
    return rows


# ------------------------------------------------------------------ shell

@dataclass
class Call:
    where: str        # file:line
    word: str         # the command word as written (after make's expansion)


def _skip_quoted(s: str, i: int, q: str) -> int:
    """Index just past the quote closing the one at s[i]."""
    j = i + 1
    while j < len(s) and s[j] != q:
        j += 2 if (q == '"' and s[j] == "\\") else 1
    return j + 1


def _matching(s: str, i: int, open_: str, close: str) -> int:
    """Index of the `close` that matches the `open_` at s[i] (quotes respected)."""
    depth, j = 0, i
    while j < len(s):
        c = s[j]
        if c in "'\"" and (c == '"' or open_ != "{"):
            j = _skip_quoted(s, j, c)
            continue
        if c == "\\":
            j += 2
            continue
        if c == open_:
            depth += 1
        elif c == close:
            depth -= 1
            if depth == 0:
                return j
        j += 1
    raise ValueError(f"no {close!r} matching {open_!r} at {i}")


def _tokens(s: str, line0: int, subs: list):
    """(token, line, is_word) for shell text s; command substitutions found inside words are
    appended to subs as (text, line) and stand in the word as \\x00."""
    i, line = 0, line0
    n = len(s)
    while i < n:
        c = s[i]
        if c == "\\" and i + 1 < n and s[i + 1] == "\n":
            i, line = i + 2, line + 1
            continue
        if c in " \t":
            i += 1
            continue
        if c == "#":
            while i < n and s[i] != "\n":
                i += 1
            continue
        if c == "\n":
            yield "\n", line, False
            i, line = i + 1, line + 1
            continue
        two = s[i:i + 2]
        if two in ("&&", "||", ";;", "|&"):
            yield two, line, False
            i += 2
            continue
        if c in ";|&()":
            yield c, line, False
            i += 1
            continue
        if c in "<>":   # a redirection: the operator, then its target word is not a command
            j = i
            while j < n and s[j] in "<>&|":
                j += 1
            if s[i:j] == "<<":
                raise ValueError(f"line {line}: a here-document: teach shell_calls to skip its body")
            yield "REDIR", line, False
            i = j
            continue
        # a word
        word, start = [], i
        at = lambda j: line + s.count("\n", start, j)   # noqa: E731  the line of s[j]
        while i < n and s[i] not in " \t\n;|&()<>":
            c = s[i]
            if c == "\\":
                word.append(s[i + 1] if i + 1 < n else "")
                i += 2
            elif c == "'":
                j = _skip_quoted(s, i, "'")
                word.append(s[i + 1:j - 1])
                i = j
            elif c == '"':
                j = i + 1
                while j < n and s[j] != '"':
                    if s[j] == "\\":
                        j += 2
                    elif s[j:j + 2] == "$(" and s[j:j + 3] != "$((":
                        k = _matching(s, j + 1, "(", ")")
                        subs.append((s[j + 2:k], at(j)))
                        word.append("\x00")
                        j = k + 1
                    elif s[j] == "`":
                        k = s.index("`", j + 1)
                        subs.append((s[j + 1:k], at(j)))
                        word.append("\x00")
                        j = k + 1
                    else:
                        word.append(s[j])
                        j += 1
                i = j + 1
            elif s.startswith("$((", i):
                k = _matching(s, i + 1, "(", ")")
                word.append("\x00")
                i = k + 1
            elif s.startswith("$(", i):
                k = _matching(s, i + 1, "(", ")")
                subs.append((s[i + 2:k], at(i)))
                word.append("\x00")
                i = k + 1
            elif s.startswith("${", i):
                k = _matching(s, i + 1, "{", "}")
                word.append("$")
                i = k + 1
            elif c == "`":
                k = s.index("`", i + 1)
                subs.append((s[i + 1:k], at(i)))
                word.append("\x00")
                i = k + 1
            else:
                word.append(c)
                i += 1
        text = "".join(word)
        if i < n and s[i] in "<>" and text.isdigit():
            continue                        # 2>&1: the digit is the redirection's fd
        line += s.count("\n", start, i)
        yield text, line, True


def _expands(word: str) -> bool:
    return "$" in word or "\x00" in word


def shell_calls(s: str, where: str, line0: int = 1) -> list[Call]:
    """The command words of shell text s, with function names it defines removed."""
    subs: list = []
    toks = list(_tokens(s, line0, subs))
    calls, functions = [], set()
    at_cmd, skip_next, case_state, after_for, in_test, in_array = True, False, [], False, False, False
    for k, (tok, line, is_word) in enumerate(toks):
        nxt = toks[k + 1][0] if k + 1 < len(toks) else None
        if in_test:                          # [[ ... ]]: operands and operators, no commands
            in_test = tok != "]]"
            continue
        if in_array:                         # NAME=( words ): values
            in_array = tok != ")"
            continue
        if tok == "REDIR":
            skip_next = True
            continue
        if skip_next:                        # a redirection's target
            skip_next = False
            continue
        if not is_word:
            if tok == ";;" and case_state:
                case_state[-1] = "pattern"
            elif tok == ")" and case_state and case_state[-1] == "pattern":
                case_state[-1] = "body"
            at_cmd = tok in OPERATORS
            continue
        if case_state and case_state[-1] == "word":    # case WORD in
            case_state[-1] = "in"
            continue
        if case_state and case_state[-1] == "in" and tok == "in":
            case_state[-1] = "pattern"
            continue
        if case_state and case_state[-1] == "pattern":
            if tok == "esac":
                case_state.pop()
                at_cmd = False
            continue                          # a pattern, not a command
        if after_for:
            if tok in ("do",):
                after_for = False
                at_cmd = True
            continue
        if not at_cmd:
            continue
        # command position
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\[[^]]*\])?\+?=.*", tok):
            in_array = nxt == "(" and tok.endswith("=")   # an array: NAME=(a b c)
            continue                          # an assignment before the command
        if tok == "case":
            case_state.append("word")
            at_cmd = False
            continue
        if tok in ("for", "select"):
            after_for = True
            continue
        if tok == "function":
            continue
        if nxt == "(" and k + 2 < len(toks) and toks[k + 2][0] == ")":
            functions.add(tok)                # name() { ... }
            at_cmd = False
            continue
        if tok == "[[":
            in_test, at_cmd = True, False
            continue
        if tok == "esac" and case_state:     # after a last branch without ;;
            case_state.pop()
        if tok in SHELL_KEYWORDS:
            at_cmd = tok in COMMAND_PREFIXES
            continue
        calls.append(Call(f"{where}:{line}", tok))
        at_cmd = tok in COMMAND_PREFIXES
        # command -v NAME: NAME is looked up, so it is needed; from a variable (the doctor
        # asking about its list) it is no call of its own
        if tok == "command" and nxt == "-v":
            at_cmd = False
            if k + 2 < len(toks) and not _expands(toks[k + 2][0]):
                calls.append(Call(f"{where}:{line}", toks[k + 2][0]))
        # sh -c SCRIPT: read a literal script; one from a variable is the doctor running a
        # check of the list, and the list's checks are read on their own (project_calls)
        if tok in ("sh", "bash") and nxt == "-c" and k + 2 < len(toks) and not _expands(toks[k + 2][0]):
            calls.extend(shell_calls(toks[k + 2][0], where, line))
    for text, line in subs:
        calls.extend(shell_calls(text, where, line))
    return [c for c in calls if c.word not in functions]


# ------------------------------------------------------------------ Makefiles

MAKE_DEFAULTS = {"CC": "cc", "MAKE": "make", "SHELL": "/bin/sh", "CURDIR": "$CURDIR"}


def _expand(text: str, vars_: dict[str, str], depth: int = 0) -> str:
    """make's $(VAR) expansion for plain variables; functions and automatic variables
    become the placeholder $FN (a word that starts no program)."""
    if depth > 20:
        raise ValueError(f"recursive make variable in {text!r}")
    out, i = [], 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("$(", i) or text.startswith("${", i):
            k = _matching(text, i + 1, text[i + 1], ")" if text[i + 1] == "(" else "}")
            name = text[i + 2:k]
            if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                out.append(_expand(vars_.get(name, MAKE_DEFAULTS.get(name, "")), vars_, depth + 1))
            else:
                out.append("$FN")
            i = k + 1
        elif text[i] == "$" and i + 1 < len(text):
            out.append("$AUTO")                # $@ $< $^ $*
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def makefile_calls(path: Path, rel: str) -> list[Call]:
    text = path.read_text()
    lines = text.replace("\\\n", "\x01").split("\n")   # keep continuations, count lines
    vars_, recipes, lineno = {}, [], 1
    for raw in lines:
        logical = raw.replace("\x01", " ")
        if raw.startswith("\t"):
            recipes.append((logical[1:], lineno))
        else:
            m = re.match(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*(\?=|:=|::=|\+=|=)\s*(.*)$", logical)
            if m and not logical.lstrip().startswith("#"):
                name, op, value = m.groups()
                if op == "?=" and name in vars_:
                    pass
                elif op == "+=":
                    vars_[name] = vars_.get(name, "") + " " + value
                else:
                    vars_[name] = value
        lineno += 1 + raw.count("\x01")
    calls = []
    for recipe, line in recipes:
        recipe = recipe.lstrip("@-+ ")
        calls.extend(shell_calls(_expand(recipe, vars_), rel, line))
    return calls


# ------------------------------------------------------------------ Python

MAX_DEPTH = 30   # a guard against cycles of names, far beyond any real chain
SUBPROCESS = {"run", "Popen", "call", "check_call", "check_output"}
EXEC_PATH_FIRST = {"execv", "execve", "execvp", "execvpe"}  # os.execv(path, argv)


@dataclass
class PyScan:
    programs: list[Call]
    unfollowed: list[tuple[str, str, str]]    # (rel, expression, where)


class _Reader:
    """Follows argv[0] through one Python file."""

    def __init__(self, tree: ast.Module, rel: str):
        self.rel = rel
        self.tree = tree
        self.parents = {}
        for node in ast.walk(tree):
            for child in ast.iter_child_nodes(node):
                self.parents[child] = node
        self.functions = {n.name: n for n in ast.walk(tree)
                          if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        self.programs: list[Call] = []
        self.unfollowed: list[tuple[str, str, str]] = []
        # `from subprocess import run, Popen`: those bare names are subprocess's
        self.bare = {a.asname or a.name: a.name for n in ast.walk(tree)
                     if isinstance(n, ast.ImportFrom) and n.module == "subprocess" for a in n.names}

    def where(self, node) -> str:
        return f"{self.rel}:{node.lineno}"

    def _scope(self, node):
        while node in self.parents:
            node = self.parents[node]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                return node
        return self.tree

    @staticmethod
    def _own_nodes(scope):
        """The nodes of scope, not those of the functions nested in it."""
        todo = list(ast.iter_child_nodes(scope))
        while todo:
            n = todo.pop()
            yield n
            if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                todo.extend(ast.iter_child_nodes(n))

    def _assigned(self, name: str, at) -> list[ast.expr]:
        """Values assigned to `name` in the function around `at`, else at module level."""
        for scope in (self._scope(at), self.tree):
            found = []
            for n in self._own_nodes(scope):
                if isinstance(n, ast.Assign):
                    if any(isinstance(t, ast.Name) and t.id == name for t in n.targets):
                        found.append(n.value)
                elif isinstance(n, (ast.AnnAssign, ast.NamedExpr)) and n.value is not None:
                    if isinstance(n.target, ast.Name) and n.target.id == name:
                        found.append(n.value)
            if found:
                return found
        return []

    def _return_nodes(self, fn) -> list[ast.Return]:
        return [n for n in ast.walk(fn) if isinstance(n, ast.Return) and n.value is not None]

    @staticmethod
    def _is_which(node) -> str | None:
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "which" and node.args
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            return node.args[0].value
        return None

    def argv(self, node, at, depth=0, ctx=None) -> None:
        """node is an argv (a list): follow its first element."""
        ctx = ctx or at
        if depth > MAX_DEPTH:
            self.unfollowed.append((self.rel, ast.unparse(node), self.where(at)))
            return
        if isinstance(node, (ast.List, ast.Tuple)) and node.elts:
            first = node.elts[0]
            if isinstance(first, ast.Starred):
                self.argv(first.value, at, depth + 1, ctx)
            else:
                self.program(first, at, depth + 1, ctx)
            for k, e in enumerate(node.elts[:-1]):    # [wrapper ...] sh -c SCRIPT
                if (isinstance(e, ast.Constant) and e.value == "-c" and k >= 1
                        and isinstance(node.elts[k - 1], ast.Constant)
                        and node.elts[k - 1].value in ("sh", "bash")):
                    self.programs.append(Call(self.where(at), node.elts[k - 1].value))
                    self.shell(node.elts[k + 1], at)
        elif isinstance(node, ast.Name) and (values := self._assigned(node.id, ctx)):
            for v in values:
                self.argv(v, at, depth + 1, ctx)
        elif isinstance(node, ast.IfExp):
            self.argv(node.body, at, depth + 1, ctx)
            self.argv(node.orelse, at, depth + 1, ctx)
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            self.argv(node.left, at, depth + 1, ctx)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in self.functions):
            for r in self._return_nodes(self.functions[node.func.id]):
                self.argv(r.value, at, depth + 1, r)
        else:
            self.unfollowed.append((self.rel, ast.unparse(node), self.where(at)))

    def program(self, node, at, depth=0, ctx=None) -> None:
        """node is argv[0]; at is the call (reported), ctx where names are looked up."""
        ctx = ctx or at
        src = ast.unparse(node)
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            self.programs.append(Call(self.where(at), node.value))
        elif src == "sys.executable":
            pass                                   # this Python
        elif re.search(r"\b(REPO|HERE|__file__)\b", src):
            pass                                   # a file of the repository
        elif (name := self._is_which(node)) is not None:
            self.programs.append(Call(self.where(at), name))
        elif isinstance(node, ast.Name) and depth < MAX_DEPTH and (values := self._assigned(node.id, ctx)):
            for v in values:
                self.program(v, at, depth + 1, ctx)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "str"
              and node.args and depth < MAX_DEPTH):
            self.program(node.args[0], at, depth + 1, ctx)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in self.functions and depth < MAX_DEPTH):
            for r in self._return_nodes(self.functions[node.func.id]):
                self.program(r.value, at, depth + 1, r)
        else:
            self.unfollowed.append((self.rel, src, self.where(at)))

    def shell(self, node, at) -> None:
        """A shell script given to sh -c: its literal text; an f-string's {values} in a
        command's place are argv[0]s the reader cannot follow."""
        values = {}
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
        elif isinstance(node, ast.JoinedStr):
            parts = []
            for v in node.values:
                if isinstance(v, ast.Constant):
                    parts.append(v.value)
                else:
                    values[f"__value{len(values)}__"] = ast.unparse(v.value)
                    parts.append(list(values)[-1])
            text = "".join(parts)
        else:
            self.unfollowed.append((self.rel, ast.unparse(node), self.where(at)))
            return
        for c in shell_calls(text, self.where(at)):
            if c.word in values:
                self.unfollowed.append((self.rel, values[c.word], self.where(at)))
            else:
                self.programs.append(c)

    def scan(self, builders=()) -> None:
        for node in ast.walk(self.tree):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            attr = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            owner = ast.unparse(f.value) if isinstance(f, ast.Attribute) else ""
            if (name := self._is_which(node)) is not None:
                self.programs.append(Call(self.where(node), name))
            elif (owner == "subprocess" and attr in SUBPROCESS) or (owner == "" and self.bare.get(attr) in SUBPROCESS):
                args = node.args[0] if node.args else next(
                    (k.value for k in node.keywords if k.arg == "args"), None)
                shell = any(k.arg == "shell" and isinstance(k.value, ast.Constant) and k.value.value
                            for k in node.keywords)
                if args is None:
                    self.unfollowed.append((self.rel, ast.unparse(node), self.where(node)))
                elif shell:
                    self.shell(args, node)
                else:
                    self.argv(args, node)
            elif owner == "os" and (attr in EXEC_PATH_FIRST or attr.startswith("spawn")):
                self.argv(node.args[1] if attr in EXEC_PATH_FIRST else node.args[2], node)
            elif owner == "os" and attr in ("system", "popen"):
                self.shell(node.args[0], node)
            elif attr in ("create_subprocess_exec",) and node.args:
                self.program(node.args[0], node)
            elif attr in ("create_subprocess_shell",) and node.args:
                self.shell(node.args[0], node)
        for name in builders:
            for r in self._return_nodes(self.functions[name]):
                self.argv(r.value, r)


def python_scan(source: str, rel: str, builders=()) -> PyScan:
    reader = _Reader(ast.parse(source, rel), rel)
    reader.scan(builders)
    return PyScan(reader.programs, reader.unfollowed)


# ------------------------------------------------------------------ the whole project

def _python_files() -> list[Path]:
    files = [REPO / f for f in PY_FILES]
    for d in PY_DIRS:
        files += sorted(p for p in (REPO / d).rglob("*.py") if "__pycache__" not in p.parts)
    return files


def _shebang(path: Path, rel: str) -> list[Call]:
    first = path.read_text().split("\n", 1)[0]
    if not first.startswith("#!"):
        return []
    words = shlex.split(first[2:])
    out = [Call(f"{rel}:1", words[0])]
    if Path(words[0]).name == "env" and len(words) > 1:
        out.append(Call(f"{rel}:1", words[1]))
    return out


# a file without any of these words has no call that scan() looks at: skip parsing it
_MAY_CALL = re.compile(r"subprocess|which|os\.(exec|spawn|system|popen)")


@functools.cache
def project_calls() -> tuple[list[Call], list[tuple[str, str, str]]]:
    calls, unfollowed = [], []
    for rel in MAKEFILES:
        calls += makefile_calls(REPO / rel, rel)
    for rel in SCRIPTS:
        calls += _shebang(REPO / rel, rel) + shell_calls((REPO / rel).read_text(), rel)
    for row in read_list().values():           # the doctor runs each check with sh -c
        if row.check:
            calls += shell_calls(row.check, f"setup/programs.tsv ({row.program})")
    for path in _python_files():
        rel = str(path.relative_to(REPO))
        text = path.read_text()
        calls += _shebang(path, rel)
        if not _MAY_CALL.search(text) and rel not in ARGV_BUILDERS:
            continue
        scan = python_scan(text, rel, ARGV_BUILDERS.get(rel, ()))
        calls += scan.programs
        unfollowed += scan.unfollowed
    return calls, unfollowed


def unlisted(calls: list[Call], listed: dict[str, Row]) -> list[str]:
    """The calls of programs from PATH that the list lacks, as 'where: word'."""
    bad = []
    for c in calls:
        w = c.word
        if not w or w in SHELL_BUILTINS or w in SHELL_KEYWORDS:
            continue
        if "/" in w:
            # a path: the repository's own files (relative, or through a variable) start
            # nothing from PATH; an absolute system path names a program all the same
            if not w.startswith("/"):
                continue
            w = w.rsplit("/", 1)[1]
        elif _expands(w):
            bad.append(f"{c.where}: {c.word!r} (a command the check cannot name)")
            continue
        if w not in listed:
            bad.append(f"{c.where}: {w}")
    return bad


# ------------------------------------------------------------------ the tests

def test_the_list_is_well_formed():
    rows = read_list()
    for r in rows.values():
        assert r.group in ("core", "containers", "linux"), r
        assert re.fullmatch(r"[a-z0-9][a-z0-9+.-]+", r.package), r
        if r.program.startswith("<"):
            assert r.check, f"{r.program} is not a program: it needs a check"
    for r in ("rsync",):
        assert r not in rows, f"{r} was replaced (compose/images/build copies with tar)"


def test_every_program_called_is_listed():
    calls, unfollowed = project_calls()
    listed = read_list()
    names = {c.word for c in calls}
    # the reader does find what it must: a sample across the kinds of file
    for want in ("gcc", "cc", "make", "mvn", "java", "docker", "dockerd", "debootstrap",
                 "docker-compose", "objdump", "unshare", "ip", "tar", "setsid", "apt-get"):
        assert want in names, f"the reader found no call of {want}: is it blind somewhere?"
    bad = unlisted(calls, listed)
    assert not bad, "programs called but missing from setup/programs.tsv:\n" + "\n".join(bad)
    strange = [u for u in unfollowed if (u[0], u[1]) not in UNFOLLOWED]
    assert not strange, ("argv[0] the check cannot follow to a program name (make it a literal, "
                         "or say why in UNFOLLOWED):\n" + "\n".join(map(str, strange)))
    stale = set(UNFOLLOWED) - {(u[0], u[1]) for u in unfollowed}
    assert not stale, f"UNFOLLOWED entries that no longer occur: {stale}"


def test_every_listed_program_is_called():
    """A program nobody calls any more leaves the list, or the doctor installs it for nothing."""
    calls, _ = project_calls()
    called = {c.word.rsplit("/", 1)[-1] for c in calls}
    idle = [p for p in read_list() if not p.startswith("<") and p not in called]
    assert not idle, f"listed but never called: {idle}"


# the check can fail: each snippet calls a program that is not listed
SHELL_SNIPPETS = [
    "rsync -a src/ dest/",
    "x=$(rsync --version)",
    'echo "$(cat f | rsync -a)"',
    "if true; then rsync a b; fi",
    "set -e; FOO=1 rsync a b",
    "exec rsync a b",
    "command -v rsync >/dev/null",
    "setsid rsync a b </dev/null &",
    "sh -c 'rsync a b'",
    "case $1 in\nx) rsync a b ;;\nesac",
    "f() { rsync a b; }\nf",
    "for x in a b; do rsync $x c; done",
    "/usr/bin/rsync a b",
    "tar -c . | rsync a b",
    "ok 2>&1 || rsync a b",
    "case $1 in\nx) true ;;\n*) true\nesac\nrsync a b",
    '[[ -n $a || $b ]] && rsync a b',
    "a=(x y) rsync a b",
    "echo `rsync --version`",
]
PY_SNIPPETS = [
    'import subprocess\nsubprocess.run(["rsync", "-a", "a", "b"])',
    'import subprocess\nsubprocess.Popen(["rsync"], stdout=subprocess.PIPE)',
    'import shutil\nshutil.which("rsync")',
    'import subprocess\nCMD = ["rsync", "-a"]\nsubprocess.run([*CMD, "x"])',
    'import subprocess\ndef f():\n    cmd = ["rsync", "a"]\n    subprocess.check_call(cmd)',
    'import subprocess\nsubprocess.run(["sh", "-c", f"ip link && rsync {1}"])',
    'import subprocess\nsubprocess.run("rsync a b", shell=True)',
    'import os\nos.execvp("rsync", ["rsync", "a"])',
    'from subprocess import run as r\nr(args=["rsync", "a"])',
    'import subprocess, shutil\ndef find():\n    return shutil.which("rsync")\nsubprocess.run([find(), "a"])',
]


@pytest.mark.parametrize("snippet", SHELL_SNIPPETS)
def test_the_check_catches_an_unlisted_program_in_shell(snippet):
    listed = read_list()
    assert unlisted(shell_calls(snippet, "snippet"), listed), f"missed rsync in {snippet!r}"


@pytest.mark.parametrize("snippet", PY_SNIPPETS)
def test_the_check_catches_an_unlisted_program_in_python(snippet):
    scan = python_scan(snippet, "snippet.py")
    assert unlisted(scan.programs, read_list()), f"missed rsync in {snippet!r}"


def test_the_check_catches_an_unlisted_program_in_a_makefile(tmp_path):
    mk = tmp_path / "Makefile"
    mk.write_text("SYNC := rsync -a\nall:\n\t@echo hi\n\t$(SYNC) a b\n")
    assert unlisted(makefile_calls(mk, "Makefile"), read_list()) == ["Makefile:4: rsync"]


def test_the_check_flags_an_argv0_it_cannot_follow():
    scan = python_scan("import subprocess\ndef f(tool):\n    subprocess.run([tool, 'x'])\n", "s.py")
    assert scan.unfollowed == [("s.py", "tool", "s.py:3")]


def test_builtins_functions_and_paths_are_not_programs():
    calls = shell_calls('say() { echo "$*" >&2; }\nsay hi\ncd /tmp && ./build/x && "$REPO/y"\n'
                        'case $a in\nstart) exit 0 ;;\nesac\n', "s")
    assert unlisted(calls, read_list()) == []
