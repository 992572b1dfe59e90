"""The corpus: Python standard-library sources (code, comments and docstrings), no download.

A fixed list of modules, read from this interpreter's standard library in the listed order;
validation is a fixed subset of the files (split by file, so no function is half in each
split). The text differs between Python versions, and so do the demo's numbers: the run
records the version. Modules missing from an install (a stripped distribution) are skipped
and named in the run's output.
"""
from __future__ import annotations

import os
import sysconfig

# Pure-Python modules present from 3.10 to 3.13 (none of the deprecated ones removed in 3.12/3.13).
MODULES = (
    "argparse", "ast", "base64", "bdb", "calendar", "cmd", "code", "collections", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "difflib", "dis", "doctest", "email.message", "enum",
    "fileinput", "fractions", "ftplib", "functools", "gettext", "glob", "gzip", "heapq", "html.parser",
    "http.client", "imaplib", "inspect", "ipaddress", "json.decoder", "json.encoder", "locale", "logging",
    "logging.handlers", "mailbox", "mimetypes", "numbers", "optparse", "pdb", "pickle", "pkgutil",
    "platform", "plistlib", "pprint", "profile", "pstats", "queue", "random", "selectors", "shlex",
    "shutil", "smtplib", "socket", "socketserver", "statistics", "string", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace", "traceback", "typing",
    "unittest.case", "unittest.mock", "urllib.parse", "urllib.request", "uuid", "warnings", "weakref",
    "zipfile",
)
# Every 8th module of the list above from the 4th (fixed) is validation: 10 of the 76 files.
VALIDATION = tuple(MODULES[i] for i in range(3, len(MODULES), 8))

EOT = "<|endoftext|>"  # separates files in the token stream; the tokenizer's one special token


def stdlib_file(module: str) -> str | None:
    """Path of `module`'s source in this interpreter's standard library, or None. Nothing is
    imported: a module may be a file or a package (zipfile became one in 3.12)."""
    base = os.path.join(sysconfig.get_paths()["stdlib"], *module.split("."))
    for path in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(path):
            return path
    return None


def load(modules=MODULES, validation=VALIDATION) -> dict:
    """{"train": [(module, text)], "validation": [...], "missing": [module]} in list order."""
    out = {"train": [], "validation": [], "missing": []}
    for m in modules:
        path = stdlib_file(m)
        if path is None:
            out["missing"].append(m)
            continue
        with open(path, encoding="utf-8") as f:
            text = f.read()
        out["validation" if m in validation else "train"].append((m, text))
    if not out["train"] or not out["validation"]:
        raise RuntimeError(f"the standard library's sources are missing here (looked in "
                           f"{sysconfig.get_paths()['stdlib']}): the LM demo needs them as its corpus")
    return out


def _tokenizers():
    try:
        import tokenizers
    except ImportError as exc:
        raise ImportError("the LM demo needs the `tokenizers` library: pip install 'kdkernels[lm]'") from exc
    return tokenizers


def train_tokenizer(texts, vocab_size: int = 4096):
    """A byte-level BPE tokenizer (GPT-2's byte alphabet and pre-tokenizer) of exactly
    `vocab_size` entries (the 256 bytes, EOT and merges), trained on `texts` only."""
    tk = _tokenizers()
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = tk.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"the BPE trainer produced {tok.get_vocab_size()} entries, not {vocab_size}: "
                           "the training text is too small for that vocabulary")
    return tok


def encode(tok, texts) -> list[int]:
    """One stream of ids: each text followed by EOT."""
    eot = tok.token_to_id(EOT)
    ids = []
    for enc in tok.encode_batch(list(texts)):
        ids.extend(enc.ids)
        ids.append(eot)
    return ids
