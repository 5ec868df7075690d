"""cpt-lightning: continued pretraining of biomedical encoders with the CLM detour recipe."""

from cpt_lightning.module import EncoderPretraining

__all__ = ["EncoderPretraining"]
