"""PEFT tuners shipped by hf_ext: AoT P-Tuning (`hf_ext.tuners.aot_ptuning`)."""

__all__: list[str] = []
