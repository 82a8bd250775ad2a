"""Fidelity of spillover's INT4 weights on real text: perplexity and top-1 agreement against the bf16 weights.

    python -m bench.fidelity --model QDIR --hf HFDIR [--text FILE] [--context 512] [--max-tokens 1024] [--json OUT]

* INT4: ``spillover perplexity --model QDIR --text FILE --context C --max-tokens T --device cpu --json …`` (both
  processes, the real pipeline; ``compute.perplexity`` states the method);
* bf16: stock transformers with ``HFDIR`` (the weights the INT4 ones were quantized from), the same tokens, the
  same windows, the same scoring (``compute.perplexity.windows_of``);
* top-1 agreement: the share of scored positions where both rank the same token first.

The default text is the running Python's ``Lib/textwrap.py``, which ships with every Python installation.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import click
import torch

from compute.perplexity import DEFAULT_CONTEXT, windows_of


@torch.inference_mode()
def bf16_scores(hf_dir: Path, ids: list[int], context: int) -> tuple[float, list[int]]:
    """(perplexity, top-1 per scored position) of the bf16 model, by ``compute.perplexity``'s method."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    nll, top1 = 0.0, []
    for window in windows_of(ids, context):
        logits = model(torch.tensor([window])).logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, torch.tensor(window[1:]), reduction="sum").item()
        top1 += logits.argmax(-1).tolist()
    return math.exp(nll / len(top1)), top1


@click.command()
@click.option("--model", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The spillover-int4 directory.")
@click.option("--hf", "hf_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The bf16 Hugging Face directory it was quantized from.")
@click.option("--text", "text_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=textwrap.__file__, show_default="this Python's Lib/textwrap.py")
@click.option("--context", type=click.IntRange(min=2), default=DEFAULT_CONTEXT, show_default=True)
@click.option("--max-tokens", type=click.IntRange(min=2), default=1024, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path))
def main(model: Path, hf_dir: Path, text_path: Path, context: int, max_tokens: int, json_path: Path | None):
    """Perplexity of the INT4 model (through spillover) and of its bf16 source, and how often their top-1s agree."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model)(text_path.read_text(), add_special_tokens=False)["input_ids"][:max_tokens]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "int4.json"
        command = [sys.executable, "-m", "compute.cli", "perplexity", "--model", str(model), "--text", str(text_path),
                   "--context", str(context), "--max-tokens", str(max_tokens), "--device", "cpu", "--json", str(out)]  # fmt: skip
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        int4_seconds = time.perf_counter() - start
        int4 = json.loads(out.read_text())
    start = time.perf_counter()
    bf16_ppl, bf16_top1 = bf16_scores(hf_dir, ids, context)
    bf16_seconds = time.perf_counter() - start
    if int4["scored"] != len(bf16_top1):
        raise click.ClickException(f"the INT4 run scored {int4['scored']} tokens, the bf16 one {len(bf16_top1)}")
    agreement = sum(a == b for a, b in zip(int4["top1"], bf16_top1)) / len(bf16_top1)
    result = {
        "model": str(model), "hf": str(hf_dir), "text": str(text_path), "python": sys.version.split()[0],
        "context": context, "tokens": len(ids), "scored": len(bf16_top1),
        "perplexity_bf16": bf16_ppl, "perplexity_int4": int4["perplexity"], "top1_agreement": agreement,
        "seconds_int4": int4_seconds, "seconds_bf16": bf16_seconds,
        "command": " ".join(["python", "-m", "bench.fidelity", *sys.argv[1:]]),
    }  # fmt: skip
    click.echo(
        f"{model.name}: perplexity bf16 {bf16_ppl:.3f}, INT4 {int4['perplexity']:.3f}; top-1 agreement "
        f"{agreement:.1%} over {len(bf16_top1)} positions ({text_path}, windows of {context})"
    )
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
