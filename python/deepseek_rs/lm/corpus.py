"""The offline reference corpus: real English text that ships with the installed Python packages.

What it holds: the docstrings (module, class, function) of every ``.py`` file of the standard
library and of the distributions that ``pip install deepseek-rs[lm]`` brings (the package's core
dependencies and its ``lm`` extra, followed transitively through their installed metadata), and
the text files those distributions ship (``.md``, ``.rst``, ``.txt``, licences, the
``METADATA`` long description). One source file is one document.

What determines it: the Python version (the standard library) and the versions of those
distributions, all recorded in ``manifest.json``; the extraction, the deduplication and the
split are deterministic functions of the files' contents. Two machines with the same versions
build the same bytes, which the manifest's SHA-256 checksums let anyone check
(:func:`verify`). Debian's ``/usr/share/doc`` is deliberately not used: a CI machine only has
what the project's own files install.

Processing, in the order of sorted document ids (``<distribution>/<path>``, ``stdlib/<path>``):
paragraphs (blank-line separated) of 40 characters or more that were already seen, compared
after collapsing whitespace and case, are dropped (transformers alone repeats thousands of
docstrings); a document left with fewer than ``MIN_DOC_CHARS`` characters is dropped. The split
is by document: the first 8 hex digits of ``sha256(id)`` modulo 1000 put it in ``train``
(< 900), ``valid`` (< 950) or ``test``.

Files written to the output directory: ``train.jsonl``, ``valid.jsonl``, ``test.jsonl`` (one
``{"id", "source", "text"}`` per line: the JSONL the data filter reads), ``tokenizer.json``
(byte-level BPE trained on ``train`` with the ``tokenizers`` library), and ``manifest.json``.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import importlib.metadata as md
import json
import logging
import re
import sys
import sysconfig
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

from ..errors import InvalidValueError

log = logging.getLogger(__name__)

#: The distributions whose dependency closure the corpus reads: deepseek-rs's core dependencies
#: and its ``lm`` extra (pyproject.toml).
ROOTS = ("numpy", "torch", "pyyaml", "tqdm", "pydantic", "transformers", "tokenizers", "scikit-learn")
SPLITS = ("train", "valid", "test")
MIN_DOC_CHARS = 200
MIN_PARAGRAPH_CHARS = 40  # shorter paragraphs ("Args:", "Example::") may repeat
MAX_FILE_BYTES = 2_000_000
TEXT_SUFFIXES = (".md", ".rst", ".txt")
VOCAB_SIZE = 4096
EOS = "<|endoftext|>"
MANIFEST_VERSION = 1


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dependency_closure(roots: Iterable[str] = ROOTS) -> Dict[str, str]:
    """``{canonical name: version}`` of the installed distributions that ``roots`` require,
    transitively (requirement markers evaluated here, extras followed; missing ones skipped)."""
    from packaging.requirements import Requirement  # packaging ships with pip's toolchain

    found: Dict[str, str] = {}
    todo: List[Tuple[str, frozenset]] = [(r, frozenset()) for r in roots]
    seen = set()
    while todo:
        name, extras = todo.pop()
        key = (_canonical(name), extras)
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        found[_canonical(dist.metadata["Name"])] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            envs = [{"extra": e} for e in extras] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                todo.append((req.name, frozenset(req.extras)))
    return dict(sorted(found.items()))


def docstrings(source: str) -> List[str]:
    """The module, class and function docstrings of a Python source, in source order."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in old sources
            tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    nodes = [
        n
        for n in ast.walk(tree)
        if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
    ]
    nodes.sort(key=lambda n: getattr(n, "lineno", 0))
    out = []
    for n in nodes:
        d = ast.get_docstring(n, clean=True)
        if d and d.strip():
            out.append(d.strip())
    return out


def _read_text(path: Path) -> Optional[str]:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return None
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return text if "\x00" not in text else None


def _is_text_file(rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1]
    upper = name.upper()
    return (
        rel.endswith(TEXT_SUFFIXES)
        or name == "METADATA"
        or upper.startswith(("LICENSE", "LICENCE", "COPYING", "NOTICE", "AUTHORS"))
    )


def _document(path: Path, rel: str) -> Optional[str]:
    text = _read_text(path)
    if text is None:
        return None
    if rel.endswith(".py"):
        return "\n\n".join(docstrings(text)) or None
    if _is_text_file(rel):
        if rel.endswith("entry_points.txt") or rel.endswith("top_level.txt") or "RECORD" in rel:
            return None
        return text.strip() or None
    return None


def raw_documents(roots: Iterable[str] = ROOTS) -> Iterator[Tuple[str, str, str]]:
    """``(id, source, text)`` of every candidate document, sorted by id."""
    items: List[Tuple[str, str, Path]] = []
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for p in stdlib.rglob("*.py"):
        rel = p.relative_to(stdlib).as_posix()
        if rel.startswith(("site-packages/", "dist-packages/", "test/", "idlelib/idle_test/")):
            continue
        items.append((f"stdlib/{rel}", "stdlib", p))
    for name in dependency_closure(roots):
        dist = md.distribution(name)
        for f in dist.files or []:
            rel = f.as_posix()
            if rel.startswith("..") or not (rel.endswith(".py") or _is_text_file(rel)):
                continue
            items.append((f"{name}/{rel}", name, Path(str(dist.locate_file(f)))))
    items.sort(key=lambda t: t[0])
    for doc_id, source, path in items:
        text = _document(path, doc_id)
        if text is not None:
            yield doc_id, source, text


def _paragraph_key(p: str) -> bytes:
    return hashlib.sha1(" ".join(p.split()).lower().encode()).digest()


def deduplicate(docs: Iterable[Tuple[str, str, str]]) -> Iterator[Tuple[str, str, str]]:
    """Drop paragraphs seen before (in document order) and the documents left too short."""
    seen = set()
    for doc_id, source, text in docs:
        kept = []
        for p in re.split(r"\n\s*\n", text):
            p = p.strip("\n")
            if not p.strip():
                continue
            if len(p) >= MIN_PARAGRAPH_CHARS:
                k = _paragraph_key(p)
                if k in seen:
                    continue
                seen.add(k)
            kept.append(p)
        out = "\n\n".join(kept)
        if len(out) >= MIN_DOC_CHARS:
            yield doc_id, source, out


def split_of(doc_id: str) -> str:
    """``train``, ``valid`` or ``test``: a fixed function of the document's id."""
    h = int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16) % 1000
    return "train" if h < 900 else "valid" if h < 950 else "test"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def iter_texts(path: Path) -> Iterator[str]:
    """The ``text`` field of each line of a JSONL file (gzip-compressed if named ``*.gz``)."""
    opener: Any = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


def train_tokenizer(train_jsonl: Path, out: Path, vocab_size: int = VOCAB_SIZE) -> None:
    """A byte-level BPE (``tokenizers``) trained on ``train_jsonl``, saved as ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(iter_texts(train_jsonl), trainer=trainer)
    tok.save(str(out))


def build(
    out: Path, roots: Iterable[str] = ROOTS, vocab_size: int = VOCAB_SIZE, limit_bytes: Optional[int] = None
) -> Dict[str, Any]:
    """Build the corpus into ``out`` and return its manifest (also written as manifest.json).

    ``limit_bytes`` stops after that many bytes of deduplicated text (a quick, still
    deterministic slice for tests)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    roots = tuple(roots)
    handles = {s: open(out / f"{s}.jsonl.tmp", "w", encoding="utf-8") for s in SPLITS}
    counts = {s: [0, 0] for s in SPLITS}  # documents, characters
    by_source: Dict[str, int] = {}
    total = 0
    try:
        for doc_id, source, text in deduplicate(raw_documents(roots)):
            s = split_of(doc_id)
            handles[s].write(json.dumps({"id": doc_id, "source": source, "text": text}, ensure_ascii=False))
            handles[s].write("\n")
            counts[s][0] += 1
            counts[s][1] += len(text)
            by_source[source] = by_source.get(source, 0) + len(text)
            total += len(text.encode("utf-8"))
            if limit_bytes is not None and total >= limit_bytes:
                break
    finally:
        for h in handles.values():
            h.close()
    for s in SPLITS:
        (out / f"{s}.jsonl.tmp").replace(out / f"{s}.jsonl")
    train_tokenizer(out / "train.jsonl", out / "tokenizer.json", vocab_size)
    files = {}
    for s in SPLITS:
        p = out / f"{s}.jsonl"
        files[p.name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size, "documents": counts[s][0]}
    files["tokenizer.json"] = {"sha256": sha256_file(out / "tokenizer.json")}
    manifest = {
        "version": MANIFEST_VERSION,
        "python": ".".join(map(str, sys.version_info[:3])),
        "roots": list(roots),
        "limit_bytes": limit_bytes,
        "vocab_size": vocab_size,
        "distributions": dependency_closure(roots),
        "characters_by_source": dict(sorted(by_source.items())),
        "text_bytes": total,
        "files": files,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def verify(out: Path) -> List[str]:
    """The problems of the corpus in ``out`` against its own manifest (empty: it is intact)."""
    out = Path(out)
    mpath = out / "manifest.json"
    if not mpath.is_file():
        return [f"{mpath}: missing"]
    try:
        manifest = json.loads(mpath.read_text())
    except ValueError as e:
        return [f"{mpath}: unreadable ({e})"]
    problems = []
    for name, entry in manifest.get("files", {}).items():
        p = out / name
        if not p.is_file():
            problems.append(f"{p}: missing")
        elif sha256_file(p) != entry["sha256"]:
            problems.append(f"{p}: SHA-256 differs from the manifest")
    return problems


def same_sources(manifest: Dict[str, Any], roots: Iterable[str] = ROOTS) -> List[str]:
    """How this environment differs from the one that built ``manifest`` (empty: the same)."""
    diffs = []
    here = ".".join(map(str, sys.version_info[:3]))
    if manifest.get("python") != here:
        diffs.append(f"python {manifest.get('python')} -> {here}")
    old, new = manifest.get("distributions", {}), dependency_closure(roots)
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name):
            diffs.append(f"{name} {old.get(name)} -> {new.get(name)}")
    return diffs


def ensure(
    out: Path,
    expect: Optional[Path] = None,
    rebuild: bool = False,
    limit_bytes: Optional[int] = None,
    vocab_size: int = VOCAB_SIZE,
) -> Dict[str, Any]:
    """The corpus in ``out``, built if missing, damaged, or built from other package versions.

    ``expect``: a manifest recorded elsewhere (docs/reference-corpus.json); when this
    environment has its Python and package versions, the build must reproduce its checksums
    exactly, else :class:`InvalidValueError`; with other versions a difference is logged.
    """
    out = Path(out)
    problems = ["--rebuild"] if rebuild else verify(out)
    manifest: Optional[Dict[str, Any]] = None
    if not problems:
        manifest = json.loads((out / "manifest.json").read_text())
        diffs = same_sources(manifest)
        if diffs or manifest.get("limit_bytes") != limit_bytes or manifest.get("vocab_size") != vocab_size:
            problems = ["built from other sources or settings: " + ", ".join(diffs or ["limit/vocab"])]
    if problems:
        log.info("building the corpus in %s (%s)", out, "; ".join(problems))
        manifest = build(out, limit_bytes=limit_bytes, vocab_size=vocab_size)
    assert manifest is not None
    if expect is not None:
        want = json.loads(Path(expect).read_text())
        if same_sources(want):
            log.warning(
                "the corpus differs from %s's by its sources (%s): checksums not compared",
                expect,
                ", ".join(same_sources(want)),
            )
        else:
            bad = [
                name
                for name, entry in want.get("files", {}).items()
                if manifest["files"].get(name, {}).get("sha256") != entry["sha256"]
            ]
            if bad:
                raise InvalidValueError(
                    f"the corpus built from the same package versions as {expect} differs in {bad}"
                )
    return manifest


__all__ = [
    "EOS",
    "ROOTS",
    "SPLITS",
    "build",
    "dependency_closure",
    "docstrings",
    "ensure",
    "iter_texts",
    "raw_documents",
    "sha256_file",
    "split_of",
    "train_tokenizer",
    "verify",
]
