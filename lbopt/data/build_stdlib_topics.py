"""Build the shipped ``stdlib-topics`` data set from the Python standard library's docstrings.

Each example is the docstring of one public function, class or method defined in a standard
library module; its label is the topic of that module (text processing, networking, …). The
task is real natural-language classification with honest ambiguity (``open`` exists in many
topics, "Return the number of …" is everywhere), so a fine-tuned MiniLM stays well below 100 %.

The docstrings change between Python versions, so the *shipped* files
(``stdlib_topics/{train,validation}.jsonl.gz``, built with CPython 3.11) are the source of truth
and this script is only how they were made::

    python -m lbopt.data.build_stdlib_topics lbopt/data/stdlib_topics

The text is CPython's (PSF License Version 2, see ``stdlib_topics/LICENSE.md``).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import inspect
import json
import re
import sys
from pathlib import Path

# topic -> modules whose docstrings illustrate it (kept to modules that import quietly everywhere).
TOPICS: dict[str, list[str]] = {
    "text": [
        "string",
        "re",
        "textwrap",
        "difflib",
        "unicodedata",
        "stringprep",
        "codecs",
        "locale",
        "gettext",
        "shlex",
        "html",
        "html.parser",
        "html.entities",
    ],
    "data_formats": [
        "json",
        "json.decoder",
        "json.encoder",
        "csv",
        "pickle",
        "pickletools",
        "configparser",
        "tomllib",
        "plistlib",
        "base64",
        "binascii",
        "quopri",
        "xml.dom.minidom",
        "xml.etree.ElementTree",
        "xml.sax",
        "xml.sax.saxutils",
        "xml.sax.xmlreader",
        "xml.sax.handler",
        "xml.dom.pulldom",
        "email",
        "email.message",
        "email.parser",
        "email.generator",
        "email.header",
        "email.utils",
        "email.policy",
        "email.headerregistry",
        "email.contentmanager",
        "email.mime.text",
        "mailbox",
        "mimetypes",
        "struct",
        "marshal",
        "email.feedparser",
        "email.charset",
        "email.iterators",
        "sqlite3",
        "shelve",
        "dbm",
        "dbm.dumb",
        "xml.dom.expatbuilder",
        "xdrlib",
        "uu",
        "pprint",
    ],
    "files_and_os": [
        "os",
        "posixpath",
        "pathlib",
        "shutil",
        "glob",
        "fnmatch",
        "tempfile",
        "stat",
        "filecmp",
        "io",
        "_pyio",
        "fileinput",
        "zipfile",
        "tarfile",
        "gzip",
        "bz2",
        "lzma",
        "zlib",
        "platform",
        "sysconfig",
        "getpass",
        "netrc",
    ],
    "networking": [
        "socket",
        "ssl",
        "http.client",
        "http.server",
        "http.cookies",
        "http.cookiejar",
        "urllib.request",
        "urllib.parse",
        "urllib.response",
        "urllib.error",
        "urllib.robotparser",
        "ftplib",
        "smtplib",
        "poplib",
        "imaplib",
        "socketserver",
        "xmlrpc.client",
        "xmlrpc.server",
        "ipaddress",
        "selectors",
        "wsgiref.simple_server",
        "wsgiref.util",
        "wsgiref.headers",
        "wsgiref.handlers",
        "webbrowser",
        "cgi",
        "nntplib",
        "telnetlib",
        "smtpd",
    ],
    "concurrency": [
        "threading",
        "multiprocessing",
        "multiprocessing.pool",
        "multiprocessing.managers",
        "multiprocessing.queues",
        "multiprocessing.connection",
        "multiprocessing.synchronize",
        "multiprocessing.shared_memory",
        "multiprocessing.process",
        "concurrent.futures",
        "concurrent.futures.thread",
        "concurrent.futures.process",
        "concurrent.futures._base",
        "asyncio",
        "asyncio.events",
        "asyncio.tasks",
        "asyncio.streams",
        "asyncio.queues",
        "asyncio.locks",
        "asyncio.subprocess",
        "asyncio.base_events",
        "asyncio.transports",
        "asyncio.protocols",
        "asyncio.futures",
        "asyncio.runners",
        "queue",
        "subprocess",
        "asyncio.selector_events",
        "asyncio.unix_events",
        "asyncio.taskgroups",
        "asyncio.timeouts",
        "asyncio.sslproto",
        "multiprocessing.context",
        "multiprocessing.sharedctypes",
        "multiprocessing.util",
        "_threading_local",
        "sched",
        "signal",
    ],
    "math_and_numbers": [
        "math",
        "cmath",
        "decimal",
        "_pydecimal",
        "fractions",
        "random",
        "statistics",
        "numbers",
        "operator",
        "secrets",
        "hashlib",
        "hmac",
    ],
    "data_structures": [
        "collections",
        "collections.abc",
        "heapq",
        "bisect",
        "array",
        "itertools",
        "functools",
        "enum",
        "dataclasses",
        "types",
        "copy",
        "weakref",
        "typing",
        "graphlib",
        "reprlib",
        "contextlib",
        "abc",
    ],
    "dev_tools": [
        "unittest",
        "unittest.case",
        "unittest.mock",
        "unittest.loader",
        "unittest.runner",
        "unittest.suite",
        "unittest.result",
        "doctest",
        "pdb",
        "bdb",
        "inspect",
        "traceback",
        "logging",
        "logging.handlers",
        "logging.config",
        "trace",
        "cProfile",
        "profile",
        "pstats",
        "timeit",
        "dis",
        "ast",
        "tokenize",
        "warnings",
        "importlib",
        "importlib.util",
        "importlib.machinery",
        "importlib.abc",
        "importlib.resources",
        "pydoc",
        "argparse",
        "optparse",
        "code",
        "codeop",
        "pkgutil",
        "runpy",
        "symtable",
        "tracemalloc",
        "faulthandler",
        "compileall",
        "py_compile",
        "zipimport",
        "modulefinder",
        "rlcompleter",
        "tabnanny",
        "pyclbr",
    ],
    "date_and_time": [
        "datetime",
        "_pydatetime",
        "_strptime",
        "time",
        "calendar",
        "zoneinfo",
        "email._parseaddr",
    ],
}

MIN_CHARS = 40
MAX_CHARS = 700
VALIDATION_PERCENT = 15


def _clean(doc: str) -> str:
    text = inspect.cleandoc(doc)
    # drop doctest blocks and signature lines so the text is prose, not code
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith((">>>", "..."))]
    text = re.sub(r"\s+", " ", " ".join(lines)).strip()
    if len(text) > MAX_CHARS:
        text = text[:MAX_CHARS].rsplit(" ", 1)[0]
    return text


def _docstrings(module_name: str):
    try:
        module = importlib.import_module(module_name)
    except Exception:  # noqa: BLE001 - a module missing on this platform is simply skipped
        return
    home = {module_name, module_name.lstrip("_")}
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_"):
            continue
        owner = getattr(obj, "__module__", None)
        if owner is None or owner.lstrip("_") not in {h.lstrip("_") for h in home}:
            continue
        if inspect.isclass(obj):
            yield obj.__doc__
            for mname, member in sorted(vars(obj).items()):
                if mname.startswith("_"):
                    continue
                func = getattr(member, "__func__", member)
                if callable(func):
                    yield getattr(func, "__doc__", None)
        elif callable(obj):
            yield obj.__doc__


def build() -> list[dict]:
    seen: dict[str, str] = {}
    conflicts: set[str] = set()
    for label, modules in TOPICS.items():
        for module_name in modules:
            for doc in _docstrings(module_name):
                if not isinstance(doc, str):
                    continue
                text = _clean(doc)
                if len(text) < MIN_CHARS:
                    continue
                if text in seen and seen[text] != label:
                    conflicts.add(text)
                seen.setdefault(text, label)
    return [{"text": text, "label": label} for text, label in sorted(seen.items()) if text not in conflicts]


def _split(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    train, validation = [], []
    for row in rows:
        bucket = int(hashlib.sha1(row["text"].encode()).hexdigest(), 16) % 100
        (validation if bucket < VALIDATION_PERCENT else train).append(row)
    return train, validation


def _write(path: Path, rows: list[dict]) -> None:
    # mtime=0 keeps the gzip bytes identical between builds
    with gzip.GzipFile(path, "wb", mtime=0) as fh:
        for row in rows:
            fh.write((json.dumps(row, ensure_ascii=False) + "\n").encode())


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0] if argv else Path(__file__).parent / "stdlib_topics")
    out.mkdir(parents=True, exist_ok=True)
    train, validation = _split(build())
    _write(out / "train.jsonl.gz", train)
    _write(out / "validation.jsonl.gz", validation)
    print(f"wrote {len(train)} train / {len(validation)} validation examples to {out}")


if __name__ == "__main__":
    main()
