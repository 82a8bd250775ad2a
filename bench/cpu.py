"""CPU speed of spillover beside stock transformers (bf16), on the same prompts, in the same run.

    python -m bench.cpu --model QDIR --hf HFDIR [--prompt TEXT ...] [-n 128] [--repeats 2] [--json OUT]

For every prompt and repeat, in turn:

* spillover: ``./run.sh --model QDIR -p PROMPT --temperature 0 --device cpu -n N --output-format json`` (both
  processes, as a user runs it; a fresh pair each time), whose ``stats`` give prefill and decode tokens/s as the
  engine measures them (prefill: the prompt's forward passes to the first reply token; decode: the one-token
  passes and their sampling);
* transformers: ``Qwen2ForCausalLM.from_pretrained(HFDIR, dtype=bfloat16)`` (SDPA, loaded once, every core),
  the same chat-templated prompt: prefill = one forward over the prompt plus the greedy choice, decode = up to
  N - 1 one-token forwards with the dynamic cache, each followed by its greedy choice, stopping at an EOS id
  as spillover does.

The machine's load average is recorded before and after: on a shared machine, figures move with it. Results
go to a table on stdout and to ``--json``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import click
import torch

from compute.engine import cache_keyword

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PROMPTS = (
    "Write a Python function that checks whether a number is prime.",
    "Explain what a hash map is in three sentences.",
)


def run_spillover(model: Path, prompt: str, max_new_tokens: int, threads: int | None) -> dict:
    command = [str(ROOT / "run.sh"), "--model", str(model), "-p", prompt, "--temperature", "0", "--device", "cpu",
               "-n", str(max_new_tokens), "--output-format", "json"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800, env=env)
    if result.returncode != 0:
        raise click.ClickException(f"{' '.join(command)} failed ({result.returncode}): {result.stderr[-2000:]}")
    stats = json.loads(result.stdout)["stats"]
    return {
        "prefill_tokens": stats["prefill_tokens"],
        "prefill_tokens_per_s": stats["prefill_tokens_per_s"],
        "decode_tokens": stats["decode_tokens"],
        "decode_tokens_per_s": stats["decode_tokens_per_s"],
    }


class StockTransformers:
    """The bf16 model as transformers runs it, greedy, with its own dynamic KV cache."""

    def __init__(self, hf_dir: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        self.tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        self.model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
        eos = GenerationConfig.from_pretrained(hf_dir).eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos])
        self.cache_keyword = cache_keyword(self.model)  # the name of the KV cache argument in this transformers

    @torch.inference_mode()
    def run(self, prompt: str, max_new_tokens: int) -> dict:
        ids = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        start = time.perf_counter()
        out = self.model(input_ids=ids, use_cache=True)
        token = int(out.logits[0, -1].argmax())
        prefill_seconds = time.perf_counter() - start
        cache, decoded, start = out.past_key_values, 0, time.perf_counter()
        while token not in self.eos and decoded < max_new_tokens - 1:
            out = self.model(input_ids=torch.tensor([[token]]), use_cache=True, **{self.cache_keyword: cache})
            cache, token = out.past_key_values, int(out.logits[0, -1].argmax())
            decoded += 1
        decode_seconds = time.perf_counter() - start
        return {
            "prefill_tokens": ids.shape[1],
            "prefill_tokens_per_s": ids.shape[1] / prefill_seconds,
            "decode_tokens": decoded,
            "decode_tokens_per_s": decoded / decode_seconds if decoded else 0.0,
        }


def median(rows: list[dict], engine: str, key: str) -> float:
    return statistics.median(row[engine][key] for row in rows)


@click.command()
@click.option("--model", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The spillover-int4 directory.")
@click.option("--hf", "hf_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The same model as a Hugging Face bf16 directory, for stock transformers.")
@click.option("--prompt", "prompts", multiple=True, help="A prompt (repeatable). Default: two coding prompts.")
@click.option("-n", "--max-new-tokens", type=click.IntRange(min=2), default=128, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), help="Intra-op threads for both (OMP_NUM_THREADS for run.sh). "
              "Default: each its own (spillover: every core when nothing streams; transformers: every core).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path))
def main(model: Path, hf_dir: Path, prompts: tuple[str, ...], max_new_tokens: int, repeats: int, threads: int | None,
         json_path: Path | None):
    """Decode and prefill tokens/s of spillover (./run.sh, both processes) and of stock transformers, on CPU."""
    prompts = prompts or DEFAULT_PROMPTS
    load_before = os.getloadavg()
    if threads:
        torch.set_num_threads(threads)
    stock = StockTransformers(hf_dir)
    rows = []
    for repeat in range(repeats):
        for prompt in prompts:
            row = {"prompt": prompt, "repeat": repeat}
            row["spillover"] = run_spillover(model, prompt, max_new_tokens, threads)
            row["transformers"] = stock.run(prompt, max_new_tokens)
            rows.append(row)
            click.echo(
                f"{prompt[:40]!r:44} spillover prefill {row['spillover']['prefill_tokens_per_s']:7.1f} tok/s, decode "
                f"{row['spillover']['decode_tokens_per_s']:6.2f} tok/s | transformers bf16 prefill "
                f"{row['transformers']['prefill_tokens_per_s']:7.1f}, decode {row['transformers']['decode_tokens_per_s']:6.2f}"
            )
    summary = {
        engine: {key: median(rows, engine, key) for key in ("prefill_tokens_per_s", "decode_tokens_per_s")}
        for engine in ("spillover", "transformers")
    }
    click.echo(f"median: {json.dumps(summary)}")
    if json_path is not None:
        json_path.write_text(json.dumps({
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"processor": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "load_average_before": load_before, "load_average_after": os.getloadavg()},
            "torch": torch.__version__,
            "command": " ".join([Path(sys.executable).name, "-m", "bench.cpu", *sys.argv[1:]]),
            "model": str(model), "hf": str(hf_dir), "max_new_tokens": max_new_tokens, "threads": threads,
            "rows": rows, "median": summary,
        }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
