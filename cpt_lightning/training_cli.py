"""LightningCLI for ``cpt fit`` / ``cpt validate``: every piece named by ``class_path``."""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from cpt_lightning.cli import condense_parse_error


class ConciseErrorParser(LightningArgumentParser):
    """Prints a config problem as one line naming the field, instead of usage + a type-union dump."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:
            return super().error(message, ex)
        sys.stderr.write(f"error: {condense_parse_error(message)}\n")
        self.exit(2)


class CptCLI(LightningCLI):
    """LightningCLI with every piece (model, data, callbacks, objectives) named by ``class_path``."""

    def __init__(self, args: list[str] | None = None):
        from cpt_lightning.module import EncoderPretraining

        super().__init__(
            EncoderPretraining,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=args,
            auto_configure_optimizers=False,
        )

    def init_parser(self, **kwargs):
        self.parser_class = ConciseErrorParser
        return super().init_parser(**kwargs)
