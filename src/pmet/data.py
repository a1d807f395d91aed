"""Loaders for the datasets used by PMET / MEMIT / ROME experiments.

Every file is addressed by its path relative to :func:`pmet.paths.data_dir` (see
``SOURCES.md`` in the data folder for provenance).  :func:`ensure_file` finds it
locally or downloads it from :data:`KNOWN_FILES`; any failure becomes a
:class:`DataNotFoundError` that says what to do.  A known file of its recorded size
is checked against its recorded sha256 on first use (remembered per path, size and
mtime in ``verified_data.json`` under the cache dir); a corrupt file, or one that
cannot be parsed, raises :class:`DataIntegrityError` naming the file, what was
expected and how to fix it.

Target-string convention: CounterFact and zsRE targets are kept as the *raw*
strings with no leading space (``"English"``, not ``" English"``).  Consumers
that tokenize a target after a prompt must prepend ``" "`` themselves, exactly as
ROME/MEMIT do.  Only surrounding whitespace present in the source files (15 zsRE
eval and 10 zsRE train ``alt`` values) is stripped.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import tempfile
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

from .paths import data_dir as default_data_dir

log = logging.getLogger(__name__)

__all__ = [
    "KNOWN_FILES",
    "DataNotFoundError",
    "DataIntegrityError",
    "InvalidRecordError",
    "is_fixture_folder",
    "ensure_file",
    "verify_known_file",
    "parse_error",
    "read_json",
    "request_label",
    "validate_request",
    "CounterFactRecord",
    "load_counterfact",
    "ZsreRecord",
    "load_zsre",
    "KnownFact",
    "load_known_facts",
    "CORPORA",
    "load_text_corpus",
    "corpus_id",
    "as_dataset",
]


# --------------------------------------------------------------------------- files
class RemoteFile(NamedTuple):
    url: str | None  # None: derived file, no public host
    sha256: str | None  # of the file exactly as described in SOURCES.md
    max_bytes: int | None = None  # keep only this many leading bytes of the download
    git_blob: str | None = None  # git blob id (``git hash-object``) where only that is known (SOURCES.md)
    size: int | None = None  # bytes of the file as described in SOURCES.md (decides when a checksum is enforced)


_ROME = "https://rome.baulab.info/data/dsets/"
_GH = "https://raw.githubusercontent.com/"
_INSTRUCTED = _GH + "sev777/InstructED/203b1354fa8efb5743ffead6bffd91b74d218f11/data/portability/"
_KSPREAD = _GH + "Jometeorie/KnowledgeSpread/bdf8bc15e7957538908008409edddafaebfea513/data/"
_WILKE = _GH + "ChenhuiHu/WilKE/2aa874b4a3dae915bdebf3ef765ac06d710cc9d6/data/"
_WT2 = _GH + "qwu01/transformers_LM/c0e44300596fbdfd03097cca92373c11c9440279/data/wikitext2/"

KNOWN_FILES: dict[str, RemoteFile] = {
    # Files hosted by the ROME/MEMIT authors (not present in the shared data snapshot).
    # The complete CounterFact (21,919 records) and zsRE eval (19,086) files; only their git blob ids are known
    # (kmeng01/rome history, SOURCES.md), so a download is checked with `git hash-object`'s hash.
    "counterfact.json": RemoteFile(
        _ROME + "counterfact.json", None, git_blob="34be0e5617d9d4b884fddb197e0f7769d1a31ad3"
    ),
    "zsre_mem_eval.json": RemoteFile(
        _ROME + "zsre_mem_eval.json", None, git_blob="8546c90abc10b77ebc9fd69de178cf7837ff86dc"
    ),
    "attribute_snippets.json": RemoteFile(_ROME + "attribute_snippets.json", None),
    "idf.npy": RemoteFile(_ROME + "idf.npy", None),
    "tfidf_vocab.json": RemoteFile(_ROME + "tfidf_vocab.json", None),
    "known_1000.json": RemoteFile(
        _ROME + "known_1000.json", "61daca55318bb5260c1e62e133debef9102c7b278bbc7b19dd2ac655543f333a", size=343_229
    ),
    # CounterFact: derived merge of public subsets (no host) and its inputs.
    "counterfact/counterfact_subset_merged.json": RemoteFile(
        None, "568b4d321e035a616e7c0394c38d8fcdad640cc77f6254c7a690596a33edf79a", size=3_380_818
    ),
    "counterfact/counterfact_subset_merged.provenance.json": RemoteFile(
        None, "f12b5f42a23392333c3b0ea0a5ae930d442a41c2cf01f27077b500fa6d8c5c3c", size=371_115
    ),
    "counterfact/raw/counterfact_portability_gpt4.json": RemoteFile(
        _INSTRUCTED + "One_Hop/counterfact_portability_gpt4.json",
        "9633c56054870e7356f6ba484d11d338f1511fd1aba1a06525ab167ccf72a15e",
        size=2_711_206,
    ),
    "counterfact/raw/counterfact_subject_replace.json": RemoteFile(
        _INSTRUCTED + "Subject%20Replace/counterfact_subject_replace.json",
        "36a81b8dd513680743347d94acd00fd5f3e25baafbe6ebe951e16ff0f36f9b9d",
        size=517_115,
    ),
    "counterfact/raw/counterfact_500.json": RemoteFile(
        _GH + "furonglegend/Met/3cafe6f48801444aae7bb353367821671967782a/data/counterfact_500.json",
        "99a455fe1b99dc332ec1fa921e69fd9297606e9c51d4f108522782f6ad125803",
        size=1_023_024,
    ),
    "counterfact/raw/multi_counterfact-50.json": RemoteFile(
        _GH + "LINs-lab/CollabEdit/6e4ac0b7007a66947b2d9d9ec82b84899461f147/data/multi_counterfact-50.json",
        "6422597c432addcf07ef82e5493834d3056b993f378611f8c569276e16a3f9ba",
        size=96_814,
    ),
    "counterfact/raw/counterfact_EleutherAI_gpt-j-6B_known_toxicity_flash.json": RemoteFile(
        _WILKE + "counterfact_EleutherAI_gpt-j-6B_known_toxicity_flash.json",
        "67ef5c496c6ca898823782148c3d93da2bd2e5cf965dcbe7d2e732af03444dec",
        size=21_025,
    ),
    "counterfact/raw/counterfact_gpt2-xl_known_toxicity_flash.json": RemoteFile(
        _WILKE + "counterfact_gpt2-xl_known_toxicity_flash.json",
        "939dd6defdaf7286a221fde0f3914ad758dfa3d9fa3d3913927ad8b02862c6d9",
        size=25_964,
    ),
    "counterfact/easyedit_mend_format/counterfact-train.json": RemoteFile(
        _KSPREAD + "counterfact/counterfact-train.json",
        "bb40e12c7b740d6859e521674cf438f063c7c3e444bc1b449e74cdd0900772d0",
        size=3_849_872,
    ),
    "counterfact/easyedit_mend_format/counterfact-val.json": RemoteFile(
        _KSPREAD + "counterfact/counterfact-val.json",
        "4feb68cc1f85dcf3b285252a28f2b2193ff69971947619356236953be60ecd1f",
        size=741_112,
    ),
    "counterfact/easyedit_mend_format/counterfact-edit.json": RemoteFile(
        _KSPREAD + "counterfact/counterfact-edit.json",
        "20c225e6299b3c5b2c569bd9103aa212806e0d1e6e0c307de5c379773979b967",
        size=3_850_773,
    ),
    "zsre/zsre_mend_eval_portability_gpt4.json": RemoteFile(
        _INSTRUCTED + "One_Hop/zsre_mend_eval_portability_gpt4.json",
        "0cf155da229b2eccae19fcfe5f7a09523363d357f5f15508d1521f495ad5ecd9",
        size=842_861,
    ),
    "zsre/zsre_mend_train-1k.json": RemoteFile(
        _KSPREAD + "zsre/zsre_mend_train-1k.json",
        "09dbb446f4afa1e500e051806430d286ef260fa6dd89e3590a9756f8b060a229",
        size=524_937,
    ),
    "wikitext/wikitext-2-raw/wiki.valid.raw.txt": RemoteFile(
        _WT2 + "wiki.valid.raw", "4cd0f6876d07a413aa911261ff6d363c72d757d47f0fdd6015702014c89cb9c7", size=1_146_846
    ),
    "wikitext/wikitext-2-raw/wiki.test.raw.txt": RemoteFile(
        _WT2 + "wiki.test.raw", "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08", size=1_290_590
    ),
    "wikitext/wikitext-103-train-head/wiki.train.tokens.head.txt": RemoteFile(
        _GH + "Hongcheng-Gao/RobTest-Demo/2541445ee4850076b885b2ba5df0b51e57e35ccc/data/wiki.train.tokens",
        "404a35153f7425a473fbca5cb6b5aa500a9dc8800dd0d28a6656c82436feaae5",
        size=2_883_584,
        max_bytes=2_883_584,
    ),
}

DOWNLOAD_TIMEOUT_S = 30.0


class DataNotFoundError(FileNotFoundError):
    """A data file is missing locally and could not be downloaded."""


class DataIntegrityError(RuntimeError):
    """A data file is corrupt: its sha256 differs from the one recorded in :data:`KNOWN_FILES`, or it
    cannot be parsed. The message names the file, what was expected and how to fix it."""


class InvalidRecordError(ValueError):
    """A dataset record or edit request is malformed; the message names its id."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def git_blob_sha1(path: Path) -> str:
    """The id ``git hash-object`` prints for a file: sha1 of ``b"blob <size>\\0"`` + its bytes."""
    path = Path(path)
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checksum_mismatch(path: Path, known: RemoteFile | None) -> str | None:
    """``"sha256"`` or ``"git blob id"`` when ``path`` differs from the checksum recorded for it, else None."""
    if known is None:
        return None
    if known.sha256 and sha256_file(path) != known.sha256:
        return "sha256"
    if known.git_blob and git_blob_sha1(path) != known.git_blob:
        return "git blob id"
    return None


def checksum_ok(path: Path, known: RemoteFile | None) -> bool:
    """Whether ``path`` matches the sha256 and/or git blob id recorded for it (True when none is known)."""
    return checksum_mismatch(path, known) is None


def _download(url: str, dest: Path, max_bytes: int | None = None, timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Fetch ``url`` into ``dest`` atomically (temp file in the same folder + os.replace)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            left = max_bytes
            while left is None or left > 0:
                block = resp.read(1 << 20 if left is None else min(1 << 20, left))
                if not block:
                    break
                out.write(block)
                left = None if left is None else left - len(block)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


FIXTURE_MARKER = "FIXTURES"


def is_fixture_folder(base: os.PathLike) -> bool:
    """True for a data folder of test fixtures (it holds a ``FIXTURES`` file, e.g. ``tests/fixtures/data``):
    its files are small cuts of the real ones, so the checksums recorded in :data:`KNOWN_FILES` are not checked."""
    return (Path(base) / FIXTURE_MARKER).is_file()


def _fix_hint(rel: str, path: Path) -> str:
    """How to get a good copy of data file ``rel`` back."""
    known = KNOWN_FILES.get(rel)
    if known is not None and known.url is not None:
        return (
            f"Fix: delete {path} and pmet downloads it again from {known.url} (unless PMET_OFFLINE is "
            f"set), or copy a good '{rel}' there (see SOURCES.md in the shared data folder)."
        )
    return (
        f"Fix: copy a good '{rel}' to {path} again (see SOURCES.md in the shared data folder), or set "
        "PMET_DATA_DIR to a folder that holds one."
    )


def _expected(known: RemoteFile) -> str:
    size = f"{known.size:,} bytes, " if known.size is not None else ""
    return size + (f"sha256 {known.sha256}" if known.sha256 else f"git blob id {known.git_blob}")


_VERIFIED: dict[str, tuple[int, int]] = {}  # this process: path -> (size, mtime_ns) already checked
VERIFIED_FILE = "verified_data.json"  # under the cache dir: the same, remembered across processes


def _verified_record() -> Path:
    from .paths import cache_dir

    return cache_dir() / VERIFIED_FILE


def _load_verified() -> dict:
    try:
        data = json.loads(_verified_record().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _remember_verified(path: Path, sig: tuple[int, int], checksum: str) -> None:
    """Add ``path`` to the record of verified files (atomic replace; a failure to write only costs a re-hash)."""
    try:
        record = _verified_record()
        data = _load_verified()
        data[str(path)] = {"size": sig[0], "mtime_ns": sig[1], "checksum": checksum}
        tmp = record.with_name(f".{record.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, record)
    except OSError as exc:
        log.debug("could not record verified data file %s: %s", path, exc)


def verify_known_file(rel: str, path: Path, force: bool = False) -> None:
    """Check ``path`` (data file ``rel``) against the sha256 (or git blob id) recorded in :data:`KNOWN_FILES`.

    Without ``force`` the check runs only when the file has the recorded size: a file of another size is
    not the described file (a small test fixture of the same name, or a truncated copy, which then fails
    to parse with an error naming it), while a file of the right size with other bytes is corrupt. A
    file that passed is remembered by (path, size, mtime) in this process and in ``verified_data.json``
    under the cache dir, so every file is hashed once, not on every use. Raises
    :class:`DataIntegrityError` naming the file, the expected size and checksum, and how to fix it.
    """
    known = KNOWN_FILES.get(rel)
    checksum = known and (known.sha256 or known.git_blob)
    if not checksum:
        return
    st = path.stat()
    sig = (st.st_size, st.st_mtime_ns)
    if not force and (known.size is None or st.st_size != known.size):
        return
    key = str(path.resolve())
    if _VERIFIED.get(key) == sig:
        return
    seen = _load_verified().get(key)
    if isinstance(seen, dict) and (seen.get("size"), seen.get("mtime_ns"), seen.get("checksum")) == (*sig, checksum):
        _VERIFIED[key] = sig
        return
    wrong = checksum_mismatch(path, known)
    if wrong:
        raise DataIntegrityError(
            f"Data file '{rel}' at {path} is corrupt: expected {_expected(known)}, found {st.st_size:,} bytes "
            f"with another {wrong}. {_fix_hint(rel, path)}"
        )
    _VERIFIED[key] = sig
    _remember_verified(Path(key), sig, checksum)


def ensure_file(
    rel: str, data_dir: os.PathLike | None = None, *, verify: bool | None = None, download: bool | None = None
) -> Path:
    """Return the local path of data file ``rel``, downloading it if needed.

    ``verify=None`` (default) checks a known file's sha256 on first use when it has the recorded size
    (:func:`verify_known_file`; remembered, so it costs once per file); ``verify=True`` always checks it;
    ``verify=False`` never does. Downloads are always checked when a hash is known. ``download=None``
    means "download unless the environment variable ``PMET_OFFLINE`` is set". Files in a folder of test
    fixtures (:func:`is_fixture_folder`) are never checked against the recorded checksums. Raises
    :class:`DataNotFoundError` when the file cannot be found or fetched, :class:`DataIntegrityError` when
    it is corrupt.
    """
    base = Path(data_dir) if data_dir is not None else default_data_dir()
    path = base / rel
    known = KNOWN_FILES.get(rel)
    if path.is_file():
        if verify is not False and not is_fixture_folder(base):
            verify_known_file(rel, path, force=bool(verify))
        return path
    if download is None:
        download = not os.environ.get("PMET_OFFLINE")
    fix = (
        f"Fix: copy the file to {path}, or set PMET_DATA_DIR to a folder that holds "
        f"'{rel}' (see SOURCES.md in the shared data folder)."
    )
    if known is None or known.url is None:
        why = "it has no public download URL" if known else "it is not a known data file"
        raise DataNotFoundError(f"Data file '{rel}' not found at {path}; {why}. {fix}")
    if not download:
        raise DataNotFoundError(
            f"Data file '{rel}' not found at {path}; downloads are disabled "
            f"(PMET_OFFLINE), URL would be {known.url}. {fix}"
        )
    log.info("downloading %s -> %s", known.url, path)
    try:
        _download(known.url, path, known.max_bytes)
        wrong = checksum_mismatch(path, known)
        if wrong:
            path.unlink()
            raise ValueError(f"downloaded content has the wrong {wrong}")
    except Exception as exc:  # noqa: BLE001 - every failure becomes one clear error
        raise DataNotFoundError(
            f"Data file '{rel}' not found at {path}, and downloading it from "
            f"{known.url} failed ({type(exc).__name__}: {exc}). {fix}"
        ) from None
    return path


def _known_rel(path: Path) -> str | None:
    """The :data:`KNOWN_FILES` name of ``path`` (matched on its trailing path parts), or None."""
    parts = path.parts
    for rel in KNOWN_FILES:
        rp = Path(rel).parts
        if parts[-len(rp) :] == rp:
            return rel
    return None


def parse_error(path: Path, exc: Exception, kind: str = "JSON") -> DataIntegrityError:
    """The error for a data file that cannot be parsed: names the file and the problem, and for a known
    file its expected size and sha256 and how to get a good copy."""
    path = Path(path)
    size = path.stat().st_size if path.exists() else 0
    what = f"{type(exc).__name__}: {exc}"
    rel = _known_rel(path)
    known = KNOWN_FILES.get(rel) if rel else None
    if known is not None and (known.sha256 or known.git_blob):
        return DataIntegrityError(
            f"Data file '{rel}' at {path} cannot be read ({what}); it has {size:,} bytes, the published file "
            f"has {_expected(known)}, so it is probably truncated or damaged. {_fix_hint(rel, path)}"
        )
    return DataIntegrityError(
        f"Data file {path} ({size:,} bytes) is not valid {kind} ({what}); check or re-create the file."
    )


def read_json(path: os.PathLike) -> Any:
    """``json.load`` of ``path`` (not cached); a file that is not valid JSON raises
    :class:`DataIntegrityError` naming it, never a bare ``JSONDecodeError``."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise parse_error(Path(path), exc) from None


@functools.lru_cache(maxsize=32)
def _read_json_cached(path: str, mtime_ns: int, size: int) -> Any:
    return read_json(path)


def _read_json(path: Path) -> Any:
    """Parsed JSON cached per (path, mtime); callers must not mutate the result. A file that is not valid
    JSON raises :class:`DataIntegrityError` naming it (:func:`parse_error`)."""
    st = path.stat()
    return _read_json_cached(str(path), st.st_mtime_ns, st.st_size)


# ---------------------------------------------------------------------- validation
def _check_template(prompt: Any, subject: Any, where: str) -> None:
    if not isinstance(prompt, str) or prompt.count("{}") != 1:
        raise InvalidRecordError(f"{where}: prompt template must contain exactly one '{{}}': {prompt!r}")
    if "{" in prompt.replace("{}", "") or "}" in prompt.replace("{}", ""):
        raise InvalidRecordError(f"{where}: prompt template has stray braces: {prompt!r}")
    if not isinstance(subject, str) or not subject.strip():
        raise InvalidRecordError(f"{where}: subject is empty")


def _target_str(value: Any) -> Any:
    return value.get("str") if isinstance(value, dict) else value


def request_label(request: dict, index: int | None = None) -> str:
    """How an error names a request: ``request case_id=7``, else by position and subject
    (``request #2 (subject 'Paris')``), so a request without a case_id can still be found."""
    if request.get("case_id") is not None:
        return f"request case_id={request['case_id']}"
    pos = f" #{index}" if index is not None else ""
    subject = request.get("subject")
    return f"request{pos} (subject {subject!r})" if subject is not None else f"request{pos} (no case_id, no subject)"


def validate_request(request: dict, index: int | None = None) -> None:
    """Check an edit request ``{"prompt", "subject", "target_new"[, "target_true", "case_id"]}``.

    Targets may be plain strings or MEMIT-style ``{"str": ...}`` dicts.  Raises
    :class:`InvalidRecordError` naming the case_id (or, without one, the request's ``index`` in its
    list and its subject) when something is wrong.
    """
    if not isinstance(request, dict):
        pos = f" #{index}" if index is not None else ""
        raise InvalidRecordError(f"request{pos} must be a dict, got {type(request).__name__}")
    where = request_label(request, index)
    for key in ("prompt", "subject", "target_new"):
        if key not in request:
            raise InvalidRecordError(f"{where}: missing key {key!r}")
    _check_template(request["prompt"], request["subject"], where)
    new = _target_str(request["target_new"])
    if not isinstance(new, str) or not new.strip():
        raise InvalidRecordError(f"{where}: target_new is empty or not a string: {new!r}")
    true = _target_str(request.get("target_true"))
    if true is not None and not isinstance(true, str):
        raise InvalidRecordError(f"{where}: target_true must be a string or None: {true!r}")


# ---------------------------------------------------------------------- CounterFact
@dataclass(frozen=True)
class CounterFactRecord:
    """One CounterFact edit case.

    ``prompt`` is a template with one ``"{}"`` for the subject; targets are raw strings
    without a leading space (see module docstring).  Records from the reduced
    EasyEdit/MEND files (``schema == "reduced"``) have one paraphrase prompt (taken from
    ``rephrase_prompt``; in the 1,653 checkable cases it is a CounterFact *generation*
    prompt 1,367 times and a paraphrase prompt only 286 times), one neighborhood prompt
    whose expected answer is ``neighborhood_target``, and no relation id, entity ids,
    attribute or generation prompts.
    """

    case_id: int
    subject: str
    prompt: str
    target_new: str
    target_true: str
    relation_id: str | None = None
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    attribute_prompts: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()
    neighborhood_target: str | None = None
    target_new_id: str | None = None
    target_true_id: str | None = None
    pararel_idx: int | None = None
    schema: Literal["original", "reduced"] = "original"

    @property
    def full_fields(self) -> bool:
        """True for records in the original CounterFact schema (every field present)."""
        return self.schema == "original"

    @property
    def filled_prompt(self) -> str:
        return self.prompt.format(self.subject)

    def as_request(self) -> dict:
        """``{"case_id", "prompt", "subject", "target_new", "target_true"}`` with raw target strings."""
        return {
            "case_id": self.case_id,
            "prompt": self.prompt,
            "subject": self.subject,
            "target_new": self.target_new,
            "target_true": self.target_true,
        }


_CF_FULL = "counterfact/counterfact_subset_merged.json"
_CF_SPLITS = {s: f"counterfact/easyedit_mend_format/counterfact-{s}.json" for s in ("edit", "train", "val")}
CounterFactSplit = Literal["full", "edit", "train", "val", "all", "original"]


def _validate_cf(rec: CounterFactRecord) -> CounterFactRecord:
    where = f"CounterFact case_id={rec.case_id}"
    _check_template(rec.prompt, rec.subject, where)
    for name in ("target_new", "target_true"):
        if not getattr(rec, name).strip():
            raise InvalidRecordError(f"{where}: {name} is empty")
    return rec


def _parse_original(r: dict) -> CounterFactRecord:
    rw = r["requested_rewrite"]
    return _validate_cf(
        CounterFactRecord(
            case_id=int(r["case_id"]),
            subject=rw["subject"],
            prompt=rw["prompt"],
            target_new=rw["target_new"]["str"],
            target_true=rw["target_true"]["str"],
            relation_id=rw.get("relation_id"),
            paraphrase_prompts=tuple(r["paraphrase_prompts"]),
            neighborhood_prompts=tuple(r["neighborhood_prompts"]),
            attribute_prompts=tuple(r["attribute_prompts"]),
            generation_prompts=tuple(r["generation_prompts"]),
            neighborhood_target=rw["target_true"]["str"],
            target_new_id=rw["target_new"].get("id"),
            target_true_id=rw["target_true"].get("id"),
            pararel_idx=r.get("pararel_idx"),
            schema="original",
        )
    )


def _parse_reduced(r: dict) -> CounterFactRecord:
    case_id, subject, filled = int(r["case_id"]), r["subject"], r["prompt"]
    where = f"CounterFact case_id={case_id}"
    if not isinstance(subject, str) or not subject.strip() or subject not in filled:
        raise InvalidRecordError(f"{where}: subject {subject!r} does not occur in prompt {filled!r}")
    template = filled.replace(subject, "{}", 1)
    rec = _validate_cf(
        CounterFactRecord(
            case_id=case_id,
            subject=subject,
            prompt=template,
            target_new=r["target_new"],
            target_true=r["ground_truth"],
            paraphrase_prompts=(r["rephrase_prompt"],),
            neighborhood_prompts=(r["locality_prompt"],),
            neighborhood_target=r["locality_ground_truth"],
            schema="reduced",
        )
    )
    if rec.filled_prompt != filled:
        raise InvalidRecordError(f"{where}: template {template!r} does not format back to {filled!r}")
    return rec


@functools.lru_cache(maxsize=16)
def _cf_file(path: str, mtime_ns: int, size: int, reduced: bool) -> tuple[CounterFactRecord, ...]:
    parse = _parse_reduced if reduced else _parse_original
    return tuple(parse(r) for r in _read_json_cached(path, mtime_ns, size))


def _load_cf_file(rel: str, base: os.PathLike | None, reduced: bool) -> tuple[CounterFactRecord, ...]:
    path = ensure_file(rel, base)
    st = path.stat()
    return _cf_file(str(path), st.st_mtime_ns, st.st_size, reduced)


def load_counterfact(
    split: CounterFactSplit = "full",
    full_fields_only: bool = False,
    limit: int | None = None,
    data_dir: os.PathLike | None = None,
) -> list[CounterFactRecord]:
    """Load CounterFact records (every record is validated; bad ones raise InvalidRecordError).

    * ``"full"``: the 1,653 original-schema records of ``counterfact_subset_merged.json``.
    * ``"edit"`` / ``"train"`` / ``"val"``: the EasyEdit/MEND files (10,000 / 10,000 / 1,919
      reduced records, file order = ascending case_id).  The template is rebuilt by
      replacing the first occurrence of the subject in the filled prompt with ``"{}"``
      (this round-trips for all 21,919 records and matches the original template for
      all 1,653 that can be checked).
    * ``"all"``: all 21,919 case ids sorted by case_id, original-schema records where
      available, reduced ones otherwise.
    * ``"original"``: ROME's complete ``counterfact.json`` (downloaded when missing).

    ``full_fields_only`` keeps original-schema records only; for ``edit``/``train``/``val``
    it returns the original-schema records of that split's case ids (1,298 / 292 / 63).
    ``limit`` keeps the first ``limit`` records after filtering.
    """
    if split in ("full", "original"):
        records = list(_load_cf_file(_CF_FULL if split == "full" else "counterfact.json", data_dir, False))
    elif split in _CF_SPLITS:
        records = list(_load_cf_file(_CF_SPLITS[split], data_dir, True))
        if full_fields_only:
            full = {r.case_id: r for r in _load_cf_file(_CF_FULL, data_dir, False)}
            records = [full[r.case_id] for r in records if r.case_id in full]
    elif split == "all":
        merged = {r.case_id: r for s in _CF_SPLITS.values() for r in _load_cf_file(s, data_dir, True)}
        merged.update((r.case_id, r) for r in _load_cf_file(_CF_FULL, data_dir, False))
        records = [merged[k] for k in sorted(merged)]
    else:
        raise ValueError(f"unknown CounterFact split {split!r}; expected one of {CounterFactSplit.__args__}")
    if full_fields_only:
        records = [r for r in records if r.full_fields]
    return records[:limit] if limit is not None else records


# ---------------------------------------------------------------------------- zsRE
@dataclass(frozen=True)
class ZsreRecord:
    """One zsRE (MEND format) record; ``case_id`` is its index in the source file.

    ``answer`` is the file's ``alt`` (the counterfactual answer, whitespace-stripped),
    ``true_answers`` its ``answers`` (gold answers), ``pred`` the BART prediction,
    ``loc``/``loc_ans`` the Natural Questions locality pair ("nq question: ...").
    """

    case_id: int
    subject: str
    src: str
    rephrase: str
    answer: str
    true_answers: tuple[str, ...]
    loc: str
    loc_ans: str
    pred: str
    cond: str | None = None

    @property
    def prompt(self) -> str:
        """Template: ``src`` with the first occurrence of ``subject`` replaced by ``"{}"``."""
        return self.src.replace(self.subject, "{}", 1)

    @property
    def neighborhood_prompt(self) -> str:
        """Locality prompt as MEMIT builds it: ``loc + "?"``; its answer is ``" " + loc_ans``."""
        return self.loc + "?"

    def as_request(self, target: Literal["memit", "alt"] = "memit") -> dict:
        """Edit request for this record.

        ``target="memit"`` reproduces MEMIT/ROME's ``MENDQADataset`` (used for the PMET
        paper's zsRE numbers): target_new is ``answers[0]`` (the gold answer, *not*
        ``alt``); MEMIT's target_true is the placeholder ``"<|endoftext|>"``, given here as
        None.  ``target="alt"`` (EasyEdit convention) edits towards ``alt`` with the gold
        answer as target_true.
        """
        if target == "memit":
            new, true = self.true_answers[0], None
        elif target == "alt":
            new, true = self.answer, self.true_answers[0]
        else:
            raise ValueError(f"target must be 'memit' or 'alt', got {target!r}")
        return {
            "case_id": self.case_id,
            "prompt": self.prompt,
            "subject": self.subject,
            "target_new": new,
            "target_true": true,
        }


_ZSRE = {
    "eval": "zsre/zsre_mend_eval_portability_gpt4.json",
    "train": "zsre/zsre_mend_train-1k.json",
    "mem_eval": "zsre_mem_eval.json",
}


def _parse_zsre(i: int, r: dict) -> ZsreRecord:
    where = f"zsRE case_id={i}"
    subject, src = r.get("subject"), r.get("src")
    if not isinstance(subject, str) or not subject.strip():
        raise InvalidRecordError(f"{where}: subject is empty")
    if not isinstance(src, str) or subject not in src:
        raise InvalidRecordError(f"{where}: subject {subject!r} does not occur in src {src!r}")
    answers = tuple(a.strip() for a in r.get("answers") or ())
    if not answers or not answers[0]:
        raise InvalidRecordError(f"{where}: no gold answer")
    alt = (r.get("alt") or "").strip()
    if not alt:
        raise InvalidRecordError(f"{where}: 'alt' (new target) is empty")
    rec = ZsreRecord(
        case_id=i,
        subject=subject,
        src=src,
        rephrase=r["rephrase"],
        answer=alt,
        true_answers=answers,
        loc=r["loc"],
        loc_ans=r["loc_ans"].strip(),
        pred=r.get("pred", ""),
        cond=r.get("cond"),
    )
    _check_template(rec.prompt, subject, where)
    return rec


def load_zsre(
    split: Literal["eval", "train", "mem_eval"] = "eval",
    limit: int | None = None,
    *,
    strict: bool = False,
    data_dir: os.PathLike | None = None,
) -> list[ZsreRecord]:
    """Load zsRE records: ``"eval"`` = EasyEdit's 1,037-record subset of the MEND eval split,
    ``"train"`` = 1,000 MEND train records, ``"mem_eval"`` = ROME/MEMIT's complete ``zsre_mem_eval.json``
    (19,086 records, the paper's Table 2 set; downloaded and checked against its git blob id when missing).

    Invalid records raise :class:`InvalidRecordError` when ``strict``; otherwise they are
    skipped with one logged warning.  In the shared data, eval has 0 invalid records and
    train has 2 (case_ids 534 and 723, empty ``alt``), so non-strict train yields 998.
    Every subject occurs in its ``src`` (0 failures in either file).
    """
    if split not in _ZSRE:
        raise ValueError(f"unknown zsRE split {split!r}; expected one of {sorted(_ZSRE)}")
    records, bad = [], []
    for i, raw in enumerate(_read_json(ensure_file(_ZSRE[split], data_dir))):
        try:
            records.append(_parse_zsre(i, raw))
        except (InvalidRecordError, KeyError, AttributeError) as exc:
            if strict:
                raise (
                    exc
                    if isinstance(exc, InvalidRecordError)
                    else InvalidRecordError(f"zsRE case_id={i}: malformed record ({exc!r})")
                ) from None
            bad.append(i)
    if bad:
        log.warning("zsRE %s: skipped %d invalid record(s): case_ids %s", split, len(bad), bad[:20])
    return records[:limit] if limit is not None else records


# ---------------------------------------------------------------------- known facts
@dataclass(frozen=True)
class KnownFact:
    """A record of ROME's ``known_1000.json``; ``prompt`` is filled in and may extend
    ``template.format(subject)`` by a few words (it always starts with it)."""

    known_id: int
    subject: str
    prompt: str
    template: str
    attribute: str
    relation_id: str
    prediction: str


def load_known_facts(data_dir: os.PathLike | None = None) -> list[KnownFact]:
    """The 1,209 facts GPT-2 XL knows (ROME's causal-tracing set)."""
    out = []
    for r in _read_json(ensure_file("known_1000.json", data_dir)):
        fact = KnownFact(**{f.name: r[f.name] for f in dataclasses.fields(KnownFact)})
        _check_template(fact.template, fact.subject, f"known fact known_id={fact.known_id}")
        out.append(fact)
    return out


# --------------------------------------------------------------------- text corpus
CORPORA: dict[str, tuple[str, ...]] = {
    "wikitext": (
        "wikitext/wikitext-103-train-head/wiki.train.tokens.head.txt",
        "wikitext/wikitext-2-raw/wiki.valid.raw.txt",
        "wikitext/wikitext-2-raw/wiki.test.raw.txt",
    ),
    "wikitext-2-raw": ("wikitext/wikitext-2-raw/wiki.valid.raw.txt", "wikitext/wikitext-2-raw/wiki.test.raw.txt"),
    "wikitext-103-train-head": ("wikitext/wikitext-103-train-head/wiki.train.tokens.head.txt",),
}


# C0 from Wikipedia: MEMIT/PMET's released code (layer_stats) samples Wikipedia articles through `datasets`.
# (The PMET paper's Appendix D says "sampled 10K times on Wikitext"; the code's GPT-J/NeoX files use Wikipedia.)
WIKIPEDIA = ("wikimedia/wikipedia", "20231101.en")
WIKIPEDIA_DEFAULT_CHARS = 40_000_000  # cap of a streamed read when the caller gives none


@functools.cache
def _wikipedia_status() -> tuple[bool, str]:
    """Whether Wikipedia can be streamed through ``datasets`` here (checked once per process)."""
    import importlib.util

    if importlib.util.find_spec("datasets") is None:
        return False, "the 'datasets' package is not installed"
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False, "HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set"
    from .models import _hub_reachable

    if not _hub_reachable():
        return False, "huggingface.co is not reachable"
    return True, f"{WIKIPEDIA[0]} ({WIKIPEDIA[1]}) streamed through datasets"


def resolve_corpus(name: str) -> tuple[str, str]:
    """``(corpus actually used, note)`` for a requested C0 corpus. ``"wikipedia"`` (the authors' choice) is
    used where it can be streamed; otherwise the local WikiText files stand in, and the note says so (it
    goes into a run's summary as ``c0_corpus``). Other names are returned unchanged with an empty note."""
    if name != "wikipedia":
        return name, ""
    ok, why = _wikipedia_status()
    if ok:
        return "wikipedia", f"wikipedia: {why}"
    return "wikitext", f"wikitext (fallback: Wikipedia unavailable, {why})"


def _wikipedia_paragraphs(max_chars: int | None) -> list[str]:
    """Paragraphs of the first Wikipedia articles in the dataset's order (streamed, deterministic), up to
    ``max_chars`` characters. MEMIT samples random articles of the whole dump; streaming the first ones
    avoids downloading ~20 GB. Raises :class:`DataNotFoundError` when Wikipedia cannot be reached."""
    ok, why = _wikipedia_status()
    if not ok:
        raise DataNotFoundError(f"Wikipedia text is not available: {why}. Use corpus 'wikitext' instead.")
    import datasets

    cap = WIKIPEDIA_DEFAULT_CHARS if max_chars is None else max_chars
    out, total = [], 0
    try:
        for article in datasets.load_dataset(*WIKIPEDIA, split="train", streaming=True):
            for para in article["text"].split("\n"):
                text = para.strip()
                if not text:
                    continue
                if total + len(text) >= cap:
                    out.append(text[: cap - total])
                    return out
                out.append(text)
                total += len(text)
    except Exception as exc:  # noqa: BLE001 - network / hub errors become one clear error
        raise DataNotFoundError(
            f"streaming {WIKIPEDIA[0]} ({WIKIPEDIA[1]}) failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        ) from None
    return out


def _corpus_files(name: str, data_dir: os.PathLike | None) -> list[Path]:
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; expected one of {sorted(CORPORA)}")
    return [ensure_file(rel, data_dir) for rel in CORPORA[name]]


def load_text_corpus(
    name: str = "wikitext", max_chars: int | None = None, *, drop_unk: bool = False, data_dir: os.PathLike | None = None
) -> list[str]:
    """Non-empty paragraphs (stripped lines) of a text corpus, files in :data:`CORPORA` order.

    Heading lines (`` = Title = ``, `` = = Section = = ``) and blank lines are skipped.
    A file's last line is dropped when the file does not end with a newline (the
    WikiText-103 train head is cut mid-sentence).  WikiText-103's ``<unk>`` tokens are
    kept verbatim unless ``drop_unk``.  With ``max_chars`` the paragraphs are cut so that
    their total length is at most ``max_chars``.  ``"wikipedia"`` streams the first articles of
    :data:`WIKIPEDIA` through ``datasets`` (at most ``max_chars``, default :data:`WIKIPEDIA_DEFAULT_CHARS`).
    """
    if name == "wikipedia":
        return _wikipedia_paragraphs(max_chars)
    out: list[str] = []
    total = 0
    for path in _corpus_files(name, data_dir):
        try:
            lines = path.read_text(encoding="utf-8").split("\n")  # a trailing "" means complete
        except UnicodeDecodeError as exc:
            raise parse_error(path, exc, "UTF-8 text") from None
        for line in lines[:-1]:
            text = line.strip()
            if not text or (text.startswith("= ") and text.endswith(" =")):
                continue
            if drop_unk:
                text = " ".join(t for t in text.split(" ") if t != "<unk>")
            if max_chars is not None and total + len(text) >= max_chars:
                if max_chars > total:
                    out.append(text[: max_chars - total])
                return out
            out.append(text)
            total += len(text)
    return out


@functools.lru_cache(maxsize=64)
def _sha_cached(path: str, mtime_ns: int, size: int) -> str:
    return sha256_file(Path(path))


def corpus_id(name: str = "wikitext", data_dir: os.PathLike | None = None) -> str:
    """Short stable id of a corpus's content (12 hex chars), for cache keys. For ``"wikipedia"``: the dataset
    and its config (the streamed articles come in the dataset's fixed order)."""
    h = hashlib.sha256(name.encode())
    if name == "wikipedia":
        h.update(json.dumps(WIKIPEDIA).encode())
        return h.hexdigest()[:12]
    for path in _corpus_files(name, data_dir):
        st = path.stat()
        h.update(_sha_cached(str(path), st.st_mtime_ns, st.st_size).encode())
    return h.hexdigest()[:12]


# ------------------------------------------------------------------------- helpers
def as_dataset(records: Sequence[Any] | Iterable[Any]):
    """A :class:`datasets.Dataset` with one row per dataclass record (tuples become lists)."""
    import datasets  # imported lazily: it is slow to import

    return datasets.Dataset.from_list([dataclasses.asdict(r) for r in records])
