"""cpt-lightning: continued pretraining of biomedical encoders with the CLM detour recipe."""

__all__ = ["EncoderPretraining"]


def __getattr__(name: str):
    # Lazy: the data commands should not pay for importing Lightning and transformers.
    if name == "EncoderPretraining":
        from cpt_lightning.module import EncoderPretraining

        return EncoderPretraining
    raise AttributeError(f"module 'cpt_lightning' has no attribute {name!r}")
