"""The ``spillover`` command: a click group whose subcommands live with the package that owns them.

Subcommands are imported only when invoked, so ``spillover quantize`` never imports the model code and
``compute`` never imports ``loader`` (the two processes share only ``protocol`` and ``quantizer``).
"""

from __future__ import annotations

import importlib

import click

# name -> "module:attribute" of a click command
SUBCOMMANDS: dict[str, str] = {
    "quantize": "quantizer.cli:quantize",
    "verify": "quantizer.cli:verify",
    "synth": "quantizer.cli:synth",
    "loader": "loader.main:main",
    "run": "compute.run:run",
    "perplexity": "compute.perplexity:perplexity",
    "serve": "compute.serve.main:serve",
    "bench": "bench.pipeline:bench",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = SUBCOMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        return getattr(importlib.import_module(module_name), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """spillover: run LLMs larger than GPU memory by streaming INT4 weights."""
    import logging

    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)],
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )


if __name__ == "__main__":
    # ``python -m compute.cli`` is ``spillover`` for an interpreter of one's choosing (run.sh, bench/run_gpu*.sh).
    main(prog_name="spillover")
