"""Extract the small datasets shipped with the package from pinned PyPI wheels.

Two permissively licensed (BSD-3-Clause) sources are used, both read straight
out of their distribution archives; nothing is installed or imported:

* ``Django`` -- the French gettext catalogs of Django core and its contrib
  apps become English->French user-interface translation pairs in alpaca
  format (``django_en_fr.jsonl``).
* ``chatterbot-corpus`` -- the English YAML dialogues become single- or
  multi-turn chat conversations (``chatterbot_en_qa.jsonl``).

The licence text of each source is copied next to the data, and a README with
record counts is written. Versions are pinned so that the output is
reproducible; bumping a pin is the only way the data should change.

Example:
    Regenerate the data in place (needs access to PyPI)::

        $ python -m pipeline.assets.extract_data

    or write it somewhere else::

        $ python -m pipeline.assets.extract_data --out /tmp/assets
"""

from __future__ import annotations

import argparse
import gettext
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

DJANGO_VERSION = "5.2.19"
CHATTERBOT_CORPUS_VERSION = "1.3.3"

DEFAULT_OUT = Path(__file__).resolve().parent / "data"

DJANGO_FILE = "django_en_fr.jsonl"
CHAT_FILE = "chatterbot_en_qa.jsonl"
DJANGO_LICENSE_FILE = "django-LICENSE.txt"
CHAT_LICENSE_FILE = "chatterbot-corpus-LICENSE.txt"

TRANSLATE_INSTRUCTION = "Translate this user-interface text from English to French."
MIN_CHARS = 2
MAX_CHARS = 200

# gettext joins a message context and its id with EOT in compiled catalogs.
CONTEXT_SEP = "\x04"
# Plain licence names sort before variants such as Django's LICENSE.python,
# which covers a few files of code copied from CPython, not the catalogs.
PLAIN_LICENSE_SUFFIXES = ("", ".txt", ".md", ".rst")

REGENERATE_CMD = "python -m pipeline.assets.extract_data"


# --------------------------------------------------------------------------
# Downloading and reading archives
# --------------------------------------------------------------------------


def pip_download(requirement: str, dest: Path, *, sdist: bool = False) -> Path:
    """Download one distribution of ``requirement`` with pip, without deps.

    Args:
        requirement: An exact pin such as ``"Django==5.2.19"``.
        dest: An empty directory to download into.
        sdist: Fetch the source distribution instead of the wheel.

    Returns:
        Path of the single downloaded archive.
    """
    dest.mkdir(parents=True, exist_ok=True)
    # --only-binary guarantees a wheel so reading it never depends on a build.
    kind = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
           "--disable-pip-version-check", *kind, "--dest", str(dest), requirement]
    subprocess.run(cmd, check=True)
    files = [p for p in dest.iterdir() if p.is_file()]
    if len(files) != 1:
        raise RuntimeError(f"expected one archive for {requirement}, got {files}")
    return files[0]


def _license_rank(name: str) -> tuple[int, int, str]:
    """Order licence candidates: plain ``LICENSE`` first, variants after."""
    suffix = PurePosixPath(name).suffix.lower()
    return (suffix not in PLAIN_LICENSE_SUFFIXES, len(name), name)


def _is_license_name(name: str) -> bool:
    """Whether a file name looks like a licence (LICENSE, LICENCE, license.md)."""
    return PurePosixPath(name).name.upper().startswith(("LICENSE", "LICENCE"))


def wheel_license(wheel: zipfile.ZipFile) -> str | None:
    """Return the main licence text from a wheel's ``.dist-info``, if any.

    Newer metadata (2.4) nests licences under ``.dist-info/licenses/``, older
    wheels keep them at the top of ``.dist-info``; both are accepted.
    """
    names = [n for n in wheel.namelist()
             if ".dist-info/" in n and _is_license_name(n)]
    if not names:
        return None
    return wheel.read(min(names, key=_license_rank)).decode("utf-8")


def sdist_license(sdist: Path) -> str | None:
    """Return the licence text found at the top level of an sdist tarball."""
    with tarfile.open(sdist) as tar:
        # Top level only: "<name>-<version>/LICENSE", not vendored licences.
        names = [m.name for m in tar.getmembers()
                 if m.isfile() and m.name.count("/") == 1 and _is_license_name(m.name)]
        if not names:
            return None
        member = tar.extractfile(min(names, key=_license_rank))
        assert member is not None  # isfile() members always extract
        return member.read().decode("utf-8")


def fetch_license(wheel: zipfile.ZipFile, requirement: str, workdir: Path) -> tuple[str, str]:
    """Licence text for a pinned distribution, from its wheel or its sdist.

    Some wheels (chatterbot-corpus 1.3.3) are built without their licence
    file, although the sdist of the same version ships it; falling back keeps
    the copied text authoritative instead of retyping it.

    Returns:
        The licence text and the kind of archive it came from
        (``"wheel"`` or ``"sdist"``).
    """
    text = wheel_license(wheel)
    if text is not None:
        return text, "wheel"
    text = sdist_license(pip_download(requirement, workdir, sdist=True))
    if text is None:
        raise RuntimeError(f"no licence file found for {requirement}")
    return text, "sdist"


# --------------------------------------------------------------------------
# Django: English -> French UI strings
# --------------------------------------------------------------------------


def django_catalog_names(wheel: zipfile.ZipFile) -> list[str]:
    """French ``.mo`` catalogs of Django core then contrib apps, sorted."""
    core, contrib = [], []
    for name in wheel.namelist():
        parts = PurePosixPath(name).parts
        if parts[-3:-1] != ("fr", "LC_MESSAGES") or parts[-1] not in ("django.mo", "djangojs.mo"):
            continue
        if parts[:3] == ("django", "conf", "locale"):
            core.append(name)
        elif parts[:2] == ("django", "contrib") and parts[3] == "locale":
            contrib.append(name)
    # Core first so its wording wins when an app repeats a string.
    return sorted(core) + sorted(contrib)


def catalog_pairs(mo_bytes: bytes) -> Iterator[tuple[str, str, bool]]:
    """Yield ``(english, french, had_context)`` for singular catalog entries.

    Plural entries (tuple keys) and the header (empty id) are skipped. A
    message context is stripped but reported, so the caller can prefer
    context-free wording. Surrounding whitespace is removed from both sides.
    """
    catalog: dict[Any, str] = gettext.GNUTranslations(io.BytesIO(mo_bytes))._catalog
    for key, french in catalog.items():
        if not isinstance(key, str) or not key:
            continue
        english = key.split(CONTEXT_SEP, 1)[-1]
        # Outer whitespace is template indentation, not part of the text.
        yield english.strip(), french.strip(), CONTEXT_SEP in key


def keep_pair(english: str, french: str) -> bool:
    """Whether a translation pair is usable training data."""
    if english == french:
        return False
    return all(MIN_CHARS <= len(s) <= MAX_CHARS for s in (english, french))


def django_records(wheel: zipfile.ZipFile) -> list[dict[str, str]]:
    """Build sorted, de-duplicated alpaca records from Django's catalogs.

    When one English string has several translations, the first context-free
    one (core before contrib) wins. A string known only with context is kept
    only if all its contexts agree: "April" is "avril", "Avril" or "avr."
    depending on context, and stripping the context would make such pairs
    contradict each other.
    """
    plain: dict[str, str] = {}
    with_context: dict[str, set[str]] = {}
    for name in django_catalog_names(wheel):
        for english, french, had_context in catalog_pairs(wheel.read(name)):
            if not keep_pair(english, french):
                continue
            if had_context:
                with_context.setdefault(english, set()).add(french)
            else:
                plain.setdefault(english, french)
    for english, frenches in with_context.items():
        if english not in plain and len(frenches) == 1:
            plain[english] = next(iter(frenches))
    return [{"instruction": TRANSLATE_INSTRUCTION, "input": en, "output": plain[en]}
            for en in sorted(plain, key=lambda s: (s.casefold(), s))]


# --------------------------------------------------------------------------
# chatterbot-corpus: English conversations
# --------------------------------------------------------------------------


def conversation_messages(utterances: Iterable[Any]) -> list[dict[str, str]]:
    """Turn a list of utterances into alternating user/assistant messages.

    Empty utterances are dropped before roles are assigned, and a trailing
    user turn is dropped so every chat ends with an assistant reply.
    """
    texts = [str(u).strip() for u in utterances if u is not None]
    texts = [t for t in texts if t]
    if len(texts) % 2:
        texts = texts[:-1]
    roles = ("user", "assistant")
    return [{"role": roles[i % 2], "content": t} for i, t in enumerate(texts)]


def chat_records(wheel: zipfile.ZipFile) -> tuple[list[dict[str, Any]], int, int]:
    """Build chat records from the English corpus files, in file order.

    Returns:
        The records, the number of malformed entries skipped (not a list or
        fewer than two utterances), and the number of exact duplicates
        dropped. Duplicates matter here: tech_support.yml repeats ten
        dialogues about a hundred times each.
    """
    prefix = "chatterbot_corpus/data/english/"
    names = sorted(n for n in wheel.namelist()
                   if n.startswith(prefix) and n.endswith((".yml", ".yaml")))
    records: list[dict[str, Any]] = []
    seen: set[tuple[str, ...]] = set()
    malformed = duplicates = 0
    for name in names:
        # BaseLoader keeps every scalar as written ("yes" stays "yes", not True).
        doc = yaml.load(wheel.read(name).decode("utf-8"), Loader=yaml.BaseLoader) or {}
        for conv in doc.get("conversations") or []:
            messages = conversation_messages(conv) if isinstance(conv, list) else []
            if len(messages) < 2:
                malformed += 1
                continue
            key = tuple(m["content"] for m in messages)
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            records.append({"messages": messages, "category": PurePosixPath(name).stem})
    return records, malformed, duplicates


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------


def atomic_write_text(path: Path, text: str) -> None:
    """Write UTF-8 text so readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp creates 0600 files; shipped data must be world-readable.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Write one JSON object per line, keeping non-ASCII text readable."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def _origin_note(origin: str) -> str:
    """Say where a copied licence text came from."""
    if origin == "wheel":
        return "copied from the wheel's `.dist-info`"
    return "copied from the sdist of the same version, as the wheel lacks it"


def readme_text(counts: dict[str, int], origins: dict[str, str], skipped: dict[str, int]) -> str:
    """Render the README that documents the generated files.

    Args:
        counts: Record counts keyed by output file name.
        origins: Archive kind each licence came from, keyed by licence file.
        skipped: Chat corpus entries dropped, keyed ``"malformed"`` and
            ``"duplicates"``.
    """
    return f"""\
# Shipped datasets

Small, real datasets for smoke tests and examples. They are generated from
pinned PyPI distributions, read straight from the archives (nothing is
installed). Regenerate them from the repository root with:

```
{REGENERATE_CMD}
```

Both files are UTF-8 JSON Lines: one JSON object per line.

## `{DJANGO_FILE}`

- Source: `Django=={DJANGO_VERSION}` wheel, French gettext catalogs of Django
  core and contrib apps (`django/conf/locale/fr/LC_MESSAGES/*.mo`,
  `django/contrib/*/locale/fr/LC_MESSAGES/*.mo`, including `djangojs`).
- Licence: BSD-3-Clause, Copyright (c) Django Software Foundation and
  individual contributors. Full text: `LICENSES/{DJANGO_LICENSE_FILE}`
  ({_origin_note(origins[DJANGO_LICENSE_FILE])}).
- Records: {counts[DJANGO_FILE]}
- Format (alpaca style):
  `{{"instruction": "{TRANSLATE_INSTRUCTION}", "input": <English>, "output": <French>}}`
- Selection: singular messages only (no plurals, no header); translated,
  different from the English and {MIN_CHARS}-{MAX_CHARS} characters on both
  sides; one record per English string (Django core wording first); strings
  that exist only with a gettext context are kept only when all contexts
  agree on one translation. Sorted by English text. Python placeholders such
  as `%(name)s` and inline HTML are kept as they appear in the interface.

## `{CHAT_FILE}`

- Source: `chatterbot-corpus=={CHATTERBOT_CORPUS_VERSION}` wheel,
  `chatterbot_corpus/data/english/*.yml`.
- Licence: BSD-3-Clause, Copyright (c) 2017, Gunther Cox. Full text:
  `LICENSES/{CHAT_LICENSE_FILE}` ({_origin_note(origins[CHAT_LICENSE_FILE])}).
- Records: {counts[CHAT_FILE]}
- Format: `{{"messages": [{{"role": "user", "content": ...}}, {{"role": "assistant", "content": ...}}, ...], "category": <file stem>}}`
- Selection: each corpus conversation becomes one chat with roles
  alternating from `user`, ending on `assistant` (a trailing user turn is
  dropped); empty utterances are removed. Ordered by file name, then
  position in the file. Skipped: entries that are not a list of at least
  two utterances ({skipped["malformed"]}) and exact repeats of an earlier
  conversation ({skipped["duplicates"]}).
- Caveat: the corpus follows ChatterBot's convention that each utterance
  answers the one before it. Some longer lists (notably in `emotion` and
  `computers`) are really alternative answers to the first prompt, so their
  later turns read less like a dialogue.
"""


def extract(out: Path) -> dict[str, int]:
    """Download the pinned sources and write every asset into ``out``.

    Returns:
        Record counts keyed by output file name.
    """
    django_req = f"Django=={DJANGO_VERSION}"
    chat_req = f"chatterbot-corpus=={CHATTERBOT_CORPUS_VERSION}"
    with tempfile.TemporaryDirectory(prefix="extract-data-") as tmp:
        work = Path(tmp)
        with zipfile.ZipFile(pip_download(django_req, work / "django")) as wheel:
            django = django_records(wheel)
            django_license, django_origin = fetch_license(wheel, django_req, work / "django-sdist")
        with zipfile.ZipFile(pip_download(chat_req, work / "chat")) as wheel:
            chats, malformed, duplicates = chat_records(wheel)
            chat_license, chat_origin = fetch_license(wheel, chat_req, work / "chat-sdist")

    write_jsonl(out / DJANGO_FILE, django)
    write_jsonl(out / CHAT_FILE, chats)
    atomic_write_text(out / "LICENSES" / DJANGO_LICENSE_FILE, django_license)
    atomic_write_text(out / "LICENSES" / CHAT_LICENSE_FILE, chat_license)
    counts = {DJANGO_FILE: len(django), CHAT_FILE: len(chats)}
    origins = {DJANGO_LICENSE_FILE: django_origin, CHAT_LICENSE_FILE: chat_origin}
    skipped = {"malformed": malformed, "duplicates": duplicates}
    atomic_write_text(out / "README.md", readme_text(counts, origins, skipped))
    return counts


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"output directory (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    for name, count in extract(args.out).items():
        print(f"{count:6d} records -> {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
